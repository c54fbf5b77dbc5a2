"""Run every notebook top to bottom and save it in place with its outputs, as JupyterLab does.

    .venv/bin/python tools/run_notebooks.py              # all of notebooks/*.ipynb and notebooks/exercises/
    .venv/bin/python tools/run_notebooks.py 02_mla       # some, by name (e03_routing for an exercise)

The notebooks are the course's source: edit them in JupyterLab (jupytext keeps each paired
`notebooks/NN_name.py` in step on save) or edit the `.py` and run this. Before running, each
notebook is synced with its `.py` (`jupytext --sync`: the newer side wins, so an edit made on either
side is kept). The executed notebook is saved with its figures and text outputs, so the code host
shows them; what would change on every run without meaning anything is left out: per-cell timing
metadata; consecutive prints are saved as one stream output, and a progress bar as its last state,
as JupyterLab saves them (so opening and saving a notebook changes nothing). A run that writes to
stderr, raises, or prints a machine path or an object address fails (tests/test_notebooks.py checks
the same on every CI run, and nbval re-runs every cell against its committed output).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What must not be in an executed notebook: errors, stderr, machine paths, object addresses."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and out.name == "stderr":
                found.append(f"cell {i}: stderr: {out.text.strip()[:200]}")
            text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            for marker in (" at 0x", "/tmp/", str(ROOT)):
                if marker in text:
                    found.append(f"cell {i}: output shows {marker!r}: {text.strip()[:200]}")
    return found


def settle_carriage_returns(text: str) -> str:
    """What a terminal (and JupyterLab, which saves it so) shows of text written with carriage returns:
    each line's last rewrite. A progress bar is saved as its final state, not as every update."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p]
        lines.append(parts[-1] if parts else "")
    return "\n".join(lines)


def coalesce_streams(outputs: list) -> list:
    """Consecutive stream outputs of the same name (stdout, stderr) merged into one, carriage returns
    settled as JupyterLab saves them."""
    merged: list = []
    for out in outputs:
        if merged and out.output_type == "stream" and merged[-1].output_type == "stream" \
                and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    for out in merged:
        if out.output_type == "stream":
            out.text = settle_carriage_returns(out.text)
    return merged


def run(path: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(path)], check=True)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        return [f"a cell failed: {str(e).strip().splitlines()[-1][:300]}"]
    nb.metadata["kernelspec"] = KERNELSPEC
    for cell in nb.cells:  # consecutive prints as one stream output, as JupyterLab saves them
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    found = problems(nb)
    if not found:
        nbformat.write(nb, path)
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(path)], check=True)
    return found


def main(names: list[str]) -> int:
    paths = sorted(NOTEBOOKS.glob("*.ipynb")) + sorted(NOTEBOOKS.glob("exercises/*.ipynb"))
    if names:
        paths = [p for p in paths if p.stem in names]
    failed = False
    for path in paths:
        start = time.perf_counter()
        found = run(path)
        print(f"{path.name:24s} {time.perf_counter() - start:5.1f} s  {'ok' if not found else 'NOT SAVED'}")
        for line in found:
            print("   ", line)
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
