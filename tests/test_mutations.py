"""The mutation check (tools/mutate.py) stays usable and its report stays current.

Running every mutation takes about 5 minutes, so CI does not; it checks that each curated bug
still applies to the current source (so the list cannot silently rot) and that docs/mutations.md
reports exactly these mutations, all caught.
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402


@pytest.mark.parametrize("m", mutate.MUTATIONS, ids=[m.id for m in mutate.MUTATIONS])
def test_each_mutation_applies_to_the_current_source(m, tmp_path):
    (tmp_path / m.file).parent.mkdir(parents=True)
    (tmp_path / m.file).write_text((ROOT / m.file).read_text())
    mutate.apply(tmp_path, m)
    assert (tmp_path / m.file).read_text() != (ROOT / m.file).read_text()


def test_the_report_lists_exactly_these_mutations_all_caught():
    text = mutate.REPORT.read_text()
    rows = re.findall(r"^\| `([^`]+)` \| .* \| (yes|\*\*MISSED\*\*) \|", text, re.MULTILINE)
    assert [r[0] for r in rows] == [m.id for m in mutate.MUTATIONS], "rerun: .venv/bin/python tools/mutate.py"
    assert all(r[1] == "yes" for r in rows)
