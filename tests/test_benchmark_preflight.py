"""benchmarks.preflight: the memory estimate is measured against a real training step, and the table is
appended only where --report says."""

from __future__ import annotations

from benchmarks import preflight, report


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


def test_estimate_is_compared_with_a_measured_step_and_reported(tmp_path, capsys):
    target = tmp_path / "BENCH.md"
    assert preflight.main(["--cases", "resnet18:32:64", "--hash-mib", "16", "--report", str(target)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"appended to {target}"
    text = target.read_text()
    assert "## Pre-flight" in text and "resnet18, batch 32, 64 px" in text and "SHA-256 of 16 MiB" in text
    row = next(line for line in text.splitlines() if line.startswith("| resnet18"))
    estimate, measured, ratio = (float(cell) for cell in row.strip("|").split("|")[1:4])
    assert measured > 0 and abs(ratio - estimate / measured) < 0.01
    assert 0.5 < ratio < 3  # the estimate is in the right range of a real step's peak memory


def test_a_plain_run_prints_the_rows_and_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    assert preflight.main(["--cases", "resnet18:32:64", "--hash-mib", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("{'case': 'resnet18, batch 32, 64 px', 'estimate MiB': ")
    assert out[-1].startswith("{'case': 'SHA-256 of 1 MiB in memory', 'GiB/s': ")
    assert not any("appended to" in line for line in out)
    assert docs_files() == before and list(tmp_path.iterdir()) == []
