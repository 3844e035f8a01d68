"""benchmarks.train_step: both steps run and, with --report, land in the "Train step" section; a plain run
only prints; the peak table and FLOP scaling."""

from __future__ import annotations

import re

import pytest

from benchmarks import report, train_step


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_peak_table(name, peak):
    assert train_step.bf16_peak_tflops(name) == peak


def test_flops_scale_with_pixels():
    assert train_step.train_gflop(224) == pytest.approx(24.6)
    assert train_step.train_gflop(112) == pytest.approx(24.6 / 4)


def test_cpu_run_appends_both_steps(tmp_path, monkeypatch, capsys):
    target = tmp_path / "BENCHMARKS.md"
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    assert train_step.main(["--device", "cpu", "--res", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                            "--report", str(target)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"appended to {target}"
    text = target.read_text()
    assert "## Train step" in text and "--res 32 --batch-size 2" in text and f"--report {target}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ours") or line.startswith("| reference")]
    assert len(rows) == 2 and all("| 32 | 2 | fp32 | float32 |" in row for row in rows)
    assert "n/a" in rows[0]  # no bf16 peak for a CPU


def test_our_step_is_fed_the_trainers_dtype_and_a_plain_run_writes_no_report(tmp_path, monkeypatch, capsys):
    """The trainer's loader delivers bf16 images when it trains in bf16: the benchmark must time that input.
    Without --report the rows are printed (and go to --json), and no markdown file is touched."""
    import json

    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    out = tmp_path / "rows.jsonl"
    assert train_step.main(["--device", "cpu", "--res", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                            "--precision", "bf16", "--only", "ours", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["precision"], r["input"], r["layout"]) for r in rows] == [("ours", "bf16", "bfloat16", "NHWC")]
    printed = capsys.readouterr().out
    assert re.search(r"^step ours \| res 32 \| batch 2 \| precision bf16 \|.*\| images/s [0-9.]+ \|", printed, re.M)
    assert "appended to" not in printed
    assert docs_files() == before and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
