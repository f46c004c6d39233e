"""scripts/gpu_check.sh: the dry run prints the plan (oracle subset on CUDA, the benchmark with CUDA
timings) within the 8-minute budget and runs nothing; a real run refuses a machine without CUDA."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_dry_run_prints_the_plan_within_budget(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert res.returncode == 0, res.stderr
    cmds = [l[2:] for l in res.stdout.splitlines() if l.startswith("+ ")]
    assert len(cmds) == 2
    assert "VTPRUNE_TEST_DEVICE=cuda" in cmds[0] and "pytest" in cmds[0]
    for path in re.findall(r"tests/\S+\.py", cmds[0]):
        assert (ROOT / path).is_file(), path
    assert "scripts/efficiency_benchmark.py --device cuda" in cmds[1]
    limits = [int(x) for c in cmds for x in re.findall(r"timeout (\d+)", c)]
    assert len(limits) == 2 and sum(limits) < 8 * 60
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_real_run_refuses_without_cuda(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin:" + str(Path(__import__("sys").executable).parent),
                              "OUT": str(tmp_path / "out")})
    assert res.returncode != 0 and "no CUDA device" in res.stderr


def test_bad_argument_is_refused():
    res = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
