"""The notebooks: a course that runs clean, reads in order, and survives a learner's edits.

- Every notebook is executed by nbval (`pytest` collects notebooks/*.ipynb, pyproject.toml's addopts):
  each cell's output must equal the committed one, with machine paths and object addresses
  sanitized (notebooks/nbval-sanitize.cfg) and figures not compared. In addition, here: the
  committed outputs hold no error, nothing on stderr, no machine path or object address, and the
  checks cell's "all checks passed" (`tools/run_notebooks.py` applies the same check before it saves).
- The committed notebooks carry their outputs (figures included) and the metadata JupyterLab
  writes, so opening one changes nothing and the code host shows every figure.
- Each `.ipynb` and its jupytext pair `.py` hold the same cells: an edit saved in JupyterLab updates
  both (jupytext pairing, `notebooks/jupytext.toml`); an edit made elsewhere is kept by
  `.venv/bin/jupytext --sync notebooks/*.ipynb`. Outputs never count, so running a notebook and
  saving it leaves the suite green.
- The course reads in order: each lesson says where it stands and points to the next, and 00's
  roadmap and notebooks/README.md list the lessons as they are.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))
from run_notebooks import KERNELSPEC, problems  # noqa: E402


def execute(path: Path, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def test_the_clean_output_check_catches_stderr_errors_and_stray_reprs(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import warnings\nwarnings.warn('a deliberate warning')"),
        nbformat.v4.new_code_cell("import torch\ntorch.manual_seed(0)"),
        nbformat.v4.new_code_cell("1 / 0"),
        nbformat.v4.new_code_cell("print('fine')"),
    ])
    nbformat.write(nb, tmp_path / "bad.ipynb")
    found = problems(execute(tmp_path / "bad.ipynb", tmp_path))
    assert {f.split(":")[0] for f in found} == {"cell 0", "cell 1", "cell 2"}  # not cell 3
    assert "deliberate warning" in found[0] and any(" at 0x" in f for f in found) and "ZeroDivision" in found[-1]


@pytest.mark.parametrize("path", NOTEBOOKS + EXERCISES, ids=[p.stem for p in NOTEBOOKS + EXERCISES])
def test_committed_notebook_has_clean_outputs_jupyterlab_metadata_and_its_pair(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec") == KERNELSPEC
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), \
        "committed without its outputs: run .venv/bin/python tools/run_notebooks.py"
    assert problems(nb) == []
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    # a lesson ends with its checks passing; an exercise is committed as the learner finds it, its stub
    # unwritten (tests/test_exercises.py runs it with the solution in place)
    done = "all checks passed" if path in NOTEBOOKS else ": not written yet ("
    assert any(done in o.get("text", "") for o in outputs if o.get("name") == "stdout"), \
        "the checks cell did not finish"
    for cell in nb.cells:  # consecutive prints are one stream output, as JupyterLab saves them
        outs = cell.get("outputs", [])
        pairs = zip(outs, outs[1:], strict=False)
        assert not any(a.output_type == b.output_type == "stream" and a.name == b.name for a, b in pairs)
    pair = jupytext.read(path.with_suffix(".py"))
    ours = [(c.cell_type, c.source) for c in nb.cells]
    theirs = [(c.cell_type, c.source) for c in pair.cells]
    assert ours == theirs, f"{path.name} and its .py differ: run .venv/bin/jupytext --sync notebooks/*.ipynb"


def test_the_committed_notebooks_carry_their_figures():
    figures = {p.stem: sum("image/png" in o.get("data", {}) for c in nbformat.read(p, 4).cells
                           for o in c.get("outputs", [])) for p in NOTEBOOKS}
    assert sum(figures.values()) >= 11 and figures["01_rope_yarn"] >= 1, figures


def test_the_course_reads_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["00_overview", "01_rope_yarn", "02_mla", "03_routing", "04_oracle", "05_mtp", "06_fp8", "07_text",
                     "08_scale_out", "09_training", "10_kernels", "11_training_across_gpus"]
    for i, path in enumerate(NOTEBOOKS):
        cells = nbformat.read(path, 4).cells
        assert cells[0].source.startswith(f"# {i:02d} · ") and f"*Lesson {i} of the dsv3ref course" in cells[0].source
        if i + 1 < len(NOTEBOOKS):
            assert f"**Next:** [{names[i + 1]}.ipynb]" in cells[-1].source, path.name
    overview = nbformat.read(NOTEBOOKS[0], 4).cells[0].source
    assert re.findall(r"\[(\d\d_\w+)\.ipynb\]", overview) == names[1:]  # the roadmap is the real order
    readme = (ROOT / "notebooks" / "README.md").read_text()
    assert re.findall(r"^\| \[(\d\d_\w+)\.ipynb\]", readme, re.MULTILINE) == names


def test_each_exercise_sits_beside_its_lesson_and_the_lesson_points_to_it():
    lessons = {p.stem[:2]: p for p in NOTEBOOKS}
    assert [p.stem for p in EXERCISES] == ["e02_absorbed_attention", "e03_routing", "e04_bug_hunt", "e05_mtp_combine",
                                           "e06_block_quantization"]
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for path in EXERCISES:
        lesson = lessons[path.stem[1:3]]
        first = nbformat.read(path, 4).cells[0].source
        assert first.startswith(f"# Exercise {path.stem[1:3]} · ") and f"[{lesson.stem}](../{lesson.name})" in first
        assert "solutions.py" in first
        nxt = NOTEBOOKS[NOTEBOOKS.index(lesson) + 1]
        assert f"[{nxt.name}](../{nxt.name})" in nbformat.read(path, 4).cells[-1].source
        assert f"(exercises/{path.name})" in "".join(c.source for c in nbformat.read(lesson, 4).cells[-2:]), \
            f"{lesson.name} does not point to its exercise"
        assert f"(exercises/{path.name})" in readme


def test_an_edit_saved_in_the_ipynb_survives_the_documented_sync(tmp_path):
    for f in ("jupytext.toml", "07_text.ipynb", "07_text.py"):
        shutil.copyfile(ROOT / "notebooks" / f, tmp_path / f)
    nb = nbformat.read(tmp_path / "07_text.ipynb", 4)
    nb.cells[1].source += "\n\nA learner's note, added in JupyterLab."
    nbformat.write(nb, tmp_path / "07_text.ipynb")  # the .ipynb is now the newer side
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(tmp_path / "07_text.ipynb")],
                   check=True, timeout=60)
    assert "A learner's note, added in JupyterLab." in (tmp_path / "07_text.py").read_text()
    assert "A learner's note" in nbformat.read(tmp_path / "07_text.ipynb", 4).cells[1].source


def test_nbval_sanitizes_a_path_a_learner_prints_and_catches_a_changed_output(tmp_path):
    """nbval with the project's sanitize file: a cell printing a fresh temporary folder matches the
    committed output made in another folder; a cell whose printed value changed fails."""
    cells = [nbformat.v4.new_code_cell("import tempfile\nprint(tempfile.mkdtemp())"),
             nbformat.v4.new_code_cell("print(6 * 7)")]
    cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="/tmp/tmpabc123xy\n")]
    cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    for i, cell in enumerate(cells, 1):
        cell.execution_count = i
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC})
    nbformat.write(nb, tmp_path / "learner.ipynb")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--nbval",
           "--nbval-current-env", f"--nbval-sanitize-with={ROOT / 'notebooks' / 'nbval-sanitize.cfg'}",
           str(tmp_path / "learner.ipynb")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0 and "2 passed" in ok.stdout, ok.stdout[-2000:]
    cells[1].outputs[0].text = "41\n"
    nbformat.write(nb, tmp_path / "learner.ipynb")
    changed = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert changed.returncode == 1 and "1 failed, 1 passed" in changed.stdout, changed.stdout[-2000:]
