"""README set-up commands, CI's parsing of them, and the version pins against setup.cfg's ranges."""
from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _block_after(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```[a-z]*\n(.*?)```", README, flags=re.S)
    assert m, marker
    return m.group(1).strip()


def test_readme_has_exactly_two_setup_commands():
    assert README.count("<!-- main-command -->") == 1 and README.count("<!-- test-command -->") == 1
    main = _block_after("<!-- main-command -->")
    assert main.startswith('pip install -c constraints.txt -e ".[test,lmms]" && vtprune sweep ')
    assert _block_after("<!-- test-command -->") == "python -m pytest -q"
    assert "../shared/" not in README  # only links that exist in the repository a user clones


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[test,lmms]"' in ci
    awk = re.search(r"TEST_CMD=\$\((awk .*? README\.md)\)", ci).group(1)
    out = subprocess.run(["bash", "-c", awk], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "python -m pytest -q"


def _setup_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(ln.strip()) for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_requirement_inside_its_range():
    pins = {}
    for ln in (REPO / "constraints.txt").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            pins[_norm(name)] = version.strip()
    for req in _setup_requirements():
        assert _norm(req.name) in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (req, pins[_norm(req.name)])
        if req.name not in ("lmms-eval",):
            assert "<" in str(req.specifier), f"{req}: give an upper bound"
