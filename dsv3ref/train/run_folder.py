"""A training run's folder, and how a run takes it without damaging what an earlier run left there.

    out_dir/
      metrics.jsonl      one JSON row per optimizer step ({"step": 1, ...}), every step exactly once
      step_NNNNNN/       checkpoints (dsv3ref.train.checkpoint)

- A new run refuses a folder that holds a run (a metrics.jsonl or any step_* entry), naming what it
  found and how to continue that run instead.
- A resumed run continues in its checkpoint's own folder, or in a new one (which receives the
  earlier steps' metrics rows from the checkpoint's folder). It refuses a folder holding checkpoints
  after the resume point: resuming would overwrite them.
- metrics.jsonl is rewritten whole under a temporary name and renamed into place (at most every
  WRITE_EVERY_S seconds, and at every checkpoint, at the end and when a run stops on an error), so a
  reader, or a run killed at any moment, sees whole rows only; on resume the rows after the
  checkpoint's step are dropped, as the resumed run writes them again.
- Nothing is written through a symbolic link: a metrics.jsonl or step_* entry that is a link is refused.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from dsv3ref.atomic import atomic_write_text, remove_temporaries

METRICS_FILE = "metrics.jsonl"
WRITE_EVERY_S = 5.0
_STEP = re.compile(r"^step_(\d+)$")


def _checkpoints(out_dir: Path) -> dict[int, Path]:
    """step -> entry, for out_dir's step_* entries (folders, files or links alike)."""
    found = {}
    for p in out_dir.iterdir() if out_dir.is_dir() else ():
        m = _STEP.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def read_metrics(file: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per step (a step listed twice, by an older dsv3ref: the last row)."""
    rows: dict[int, dict] = {}
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: line {i} is not JSON ({e})") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{file}: line {i} is not a metrics row (an object with an integer step)")
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def claim(out_dir: Path, resume: Path | None, start: int) -> list[dict]:
    """Check that a run may write into out_dir (module docstring); returns the metrics rows it keeps
    (those of steps 1..start). Removes what a killed run left half-written there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir: {out_dir} exists and is not a folder")
    metrics = out_dir / METRICS_FILE
    checkpoints = _checkpoints(out_dir)
    links = [p for p in (metrics, *checkpoints.values()) if p.is_symlink()]
    if links:
        raise ValueError(f"out_dir: {links[0]} is a symbolic link; training writes only inside its run folder, never "
                         "through a link (remove the link, or give another --out-dir)")
    if resume is None:
        found = ([METRICS_FILE] if metrics.exists() else []) + [checkpoints[s].name for s in sorted(checkpoints)]
        if found:
            latest = next((checkpoints[s] for s in sorted(checkpoints, reverse=True)
                           if (checkpoints[s] / "train_state.json").is_file()), None)
            hint = f"--resume {latest} continues it" if latest else "no checkpoint of it can be resumed"
            raise FileExistsError(f"out_dir: {out_dir} holds another run ({', '.join(found[:4])}"
                                  f"{', ...' if len(found) > 4 else ''}); a new run would overwrite it: give a new "
                                  f"--out-dir ({hint})")
        return []
    later = [checkpoints[s].name for s in sorted(checkpoints) if s > start]
    if later:
        raise FileExistsError(f"out_dir: {out_dir} holds checkpoints after step {start} ({', '.join(later[:4])}); "
                              f"resuming from step {start} would overwrite them: resume from the latest, or give a new "
                              "--out-dir")
    source = metrics if metrics.is_file() else Path(resume).parent / METRICS_FILE
    rows = [r for r in read_metrics(source) if r["step"] <= start] if source.is_file() else []
    remove_temporaries(out_dir)
    return rows


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


class MetricsLog:
    """metrics.jsonl of a run, rewritten atomically (see the module docstring)."""

    def __init__(self, file: Path, rows: list[dict]):
        self.file, self.rows, self.written = Path(file), list(rows), 0.0

    def add(self, row: dict) -> None:
        bad = [k for k, v in row.items() if not _finite(v)]
        if bad:
            raise FloatingPointError(f"step {row['step']}: {', '.join(bad)} not finite ({row[bad[0]]}); stopping "
                                     "(no checkpoint of this step is written)")
        self.rows.append(row)
        if time.monotonic() - self.written >= WRITE_EVERY_S:
            self.write()

    def write(self) -> None:
        atomic_write_text(self.file, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows))
        self.written = time.monotonic()
