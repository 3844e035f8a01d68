"""docs/AWS.md: every shell block is either run here (`# [tested]`) or marked as needing AWS (`# [AWS account]`)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train import plan

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "AWS.md"
MARKS = ("# [tested]", "# [AWS account]")
SAFE = ("python -m train.plan ", "python deploy/aws/", "bash deploy/aws/bootstrap.sh help", "shellcheck ")


def shell_blocks() -> list[str]:
    return re.findall(r"^```(?:bash|sh|console)[^\n]*\n(.*?)^```", DOC.read_text(), re.S | re.M)


def commands_marked_tested() -> list[str]:
    commands = []
    for block in shell_blocks():
        if block.startswith("# [tested]"):
            joined = block.replace("\\\n", " ")
            commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_every_shell_block_is_marked():
    blocks = shell_blocks()
    assert len(blocks) >= 8
    unmarked = [b.splitlines()[0] for b in blocks if not b.startswith(MARKS)]
    assert not unmarked, f"shell blocks in docs/AWS.md without {MARKS}: {unmarked}"


@pytest.mark.parametrize("command", commands_marked_tested())
def test_tested_command_runs(command):
    assert command.startswith(SAFE), f"not a command this test may run: {command}"
    argv = shlex.split(command)
    if argv[0] == "shellcheck" and shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    if argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_summary_table_matches_train_plan():
    """The dated table of plan outputs in the doc is what train.plan computes with its assumed rates."""
    gpus = {"p4d.24xlarge": "a100", "p5.48xlarge": "h100", "g6e.xlarge": "l40s"}
    rows = [r for _, _, rows in plan.markdown_tables(DOC.read_text()) for r in rows if "whole first run" in r]
    assert len(rows) == len(gpus)
    for row in rows:
        gpu = gpus[row["target"].split(",")[0]]
        p = plan.estimate(gpu=gpu, benchmarks=Path("/nonexistent"))
        assert float(row["on-demand"].lstrip("$")) == pytest.approx(p.cost(p.instance.on_demand), abs=0.01)
        assert float(row["spot (0.5x, 1 interruption)"].lstrip("$")) == pytest.approx(
            p.cost(p.spot_price, 1), abs=0.01)
