"""benchmarks.preflight: the memory estimate is measured against a real training step, and the table is
appended only where --report says."""

from __future__ import annotations

from benchmarks import preflight


def test_estimate_is_compared_with_a_measured_step_and_reported(tmp_path, capsys):
    report = tmp_path / "BENCH.md"
    assert preflight.main(["--cases", "resnet18:32:64", "--hash-mib", "16", "--report", str(report)]) == 0
    text = report.read_text()
    assert "## Pre-flight" in text and "resnet18, batch 32, 64 px" in text and "SHA-256 of 16 MiB" in text
    row = next(line for line in text.splitlines() if line.startswith("| resnet18"))
    estimate, measured, ratio = (float(cell) for cell in row.strip("|").split("|")[1:4])
    assert measured > 0 and abs(ratio - estimate / measured) < 0.01
    assert 0.5 < ratio < 3  # the estimate is in the right range of a real step's peak memory
