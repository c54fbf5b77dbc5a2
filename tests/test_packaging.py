"""pyproject.toml and environment.yml declare the same packages at the same versions."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pinned(lines):
    return {re.split(r"[=<>!~]", spec)[0].strip().lower(): spec.replace(" ", "") for spec in lines}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = project["dependencies"] + project["optional-dependencies"]["test"]
    env_lines = [m.group(1) for m in re.finditer(r"^\s+- ([A-Za-z][\w.-]*\s*[=<>!~].*)$",
                                                   (ROOT / "environment.yml").read_text(), re.M)]
    env = _pinned(env_lines)
    assert env.pop("python") == "python=3.11"
    assert env == _pinned(pip_deps)
    assert all("==" in spec for spec in pip_deps)  # CI installs exact versions


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2
    for command in commands:
        assert command in ci


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.+?)\n```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
