"""Tests for scripts/gpu_check.py: the prepared GPU check runs end to end on CPU (--dry-run) and says in one line
that it checked nothing where there is no CUDA device."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def run_check(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell would have it
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_fails():
    proc = run_check()
    assert proc.returncode == 1
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout


def test_dry_run_writes_the_benchmarks_block_from_every_step(tmp_path):
    proc = run_check("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [s["step"] for s in steps["steps"]] == ["tests", "matmul"]
    assert all(s["status"] == "ok" for s in steps["steps"])
    assert steps["env"]["torch"] == torch.__version__
    block = (tmp_path / "BENCHMARKS_block.md").read_text()
    rows = json.loads((tmp_path / "matmul.json").read_text())["rows"]
    assert rows and all(f"| {r['name']} |" in block for r in rows)  # every bench row reaches the markdown
    assert f"torch {torch.__version__}" in block and "--dry-run" in block
    assert "budget 480 s" in proc.stdout
