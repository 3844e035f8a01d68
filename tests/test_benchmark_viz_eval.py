"""benchmarks.viz_eval times viz's evaluation and Grad-CAM rows on tiny synthetic val shards, prints them, and
appends them where --report says."""

from __future__ import annotations

import re

from benchmarks import report, viz_eval


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


def test_viz_eval_benchmark_appends_both_stages(tmp_path, capsys):
    target = tmp_path / "BENCH.md"
    argv = ["--images", "12", "--max-side", "64", "--res", "32", "--batch-size", "8", "--threads", "1",
            "--arch", "resnet18", "--cams", "3", "--report", str(target)]
    assert viz_eval.main(argv) == 0
    match = re.search(r"viz evaluate images/s: ([0-9.]+)", capsys.readouterr().out)
    assert match and float(match.group(1)) > 0
    section = target.read_text().split("## viz evaluation", 1)[1]
    assert "| evaluate | cpu | resnet18 | 32 | 8 | 1 | False | 12 |" in section
    assert "| gradcam rows | cpu | resnet18 | 32 | 32 | 1 | False | 3 |" in section


def test_a_plain_run_prints_both_stages_and_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    argv = ["--images", "8", "--max-side", "48", "--res", "32", "--batch-size", "8", "--threads", "1",
            "--arch", "resnet18", "--cams", "1"]
    assert viz_eval.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^stage evaluate, device cpu, arch resnet18, res 32, .*images 8, ", out, re.M), out
    assert re.search(r"^stage gradcam rows, .*images 1, ", out, re.M) and "appended to" not in out
    assert docs_files() == before and list(tmp_path.iterdir()) == []
