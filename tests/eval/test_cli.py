"""The vtprune command line: fast help and version, the methods table, the demo on every family."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from vtprune.eval import cli

COMMANDS = ["methods", "demo", "bench", "sweep", "report"]


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom vtprune.eval.cli import main\n"
            "for argv in (['--help'], ['--version'], ['sweep', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "HEAVY []" in out
    assert "vtprune 0.1.0" in out and "COMMAND" in out


@pytest.mark.parametrize("argv", [[]] + [[c] for c in COMMANDS])
def test_help_texts_are_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":meth:", ":mod:"):
        assert markup not in text, (argv, markup)


def test_every_option_has_help():
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subs.choices) == sorted(COMMANDS)
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_methods_table_and_detail(capsys):
    from vtprune.registry import registered

    assert cli.main(["methods"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in table[2:] if ln.strip() and not ln.startswith("vtprune")}
    assert set(rows) == set(registered())
    assert rows["fastv"][1] == "D" and rows["todre"][1] == "P+D" and rows["pitome"][1] == "V"
    assert "layer=2," in " ".join(rows["fastv"]) and "keep=0.5," in " ".join(rows["fastv"])
    for name, cls in registered().items():
        assert cls.description.split()[0] in " ".join(rows[name])

    assert cli.main(["methods", "fastv"]) == 0
    detail = capsys.readouterr().out
    assert "paper:     FastV (Chen et al., \"An Image is Worth 1/2 Tokens After Layer 2\", ECCV 2024" in detail
    for f in dataclasses.fields(registered()["fastv"]):
        line = next(ln for ln in detail.splitlines() if ln.split()[:1] == [f.name])
        assert str(f.default) in line and str(f.type).split()[0] in line
    assert cli.main(["methods", "transprune"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["prune_layers"])
    assert line.split() == ["prune_layers", "tuple[int,", "...]", "7|9|12"]  # lists in spec-string syntax
    assert cli.main(["methods", "nope"]) == 2 and "registered: fastv" in capsys.readouterr().err


def test_first_sentence():
    from vtprune.eval.method_info import first_sentence

    assert first_sentence("FastV (Chen et al., ECCV 2024).\n\nStage D.") == "FastV (Chen et al., ECCV 2024)."
    assert first_sentence("A: one, e.g. two. Second.") == "A: one, e.g. two."


@pytest.mark.parametrize("family", cli.FAMILIES)
def test_demo_runs_on_every_family(family, capsys):
    assert cli.main(["demo", "--family", family, "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {spec: ln for spec in cli.DEMO_METHODS for ln in out if ln.startswith(spec + " ")}
    assert set(rows) == set(cli.DEMO_METHODS), out
    assert rows["none"].split()[-2] == "True"  # keeping every token reproduces the unpatched output


def test_demo_reports_a_bad_spec(capsys):
    assert cli.main(["demo", "--methods", "fastv:layer=9"]) == 2
    assert "fastv:layer=9" in capsys.readouterr().err
