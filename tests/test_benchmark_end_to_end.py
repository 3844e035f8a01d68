"""benchmarks.end_to_end: every stage timed and the top-1 printed; appended only where --report says."""

from benchmarks import end_to_end, report

TINY = ["--schedule.epochs=1", "--model.arch=resnet18", "--val.flip_tta=false"]


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


def test_end_to_end_times_each_stage_and_records_top1(shards_dir, tmp_path, monkeypatch, capsys):
    """One run (each costs a training and a Grad-CAM process): it writes only the --report file, never docs/;
    without --report the shared helper names no file (so main appends nothing)."""
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    assert report.report_path(None, False) is None
    before = docs_files()
    target = tmp_path / "BENCH.md"
    code = end_to_end.main(["--data", str(shards_dir), "--work", str(tmp_path / "work"), "--report", str(target),
                            *TINY])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("end-to-end top-1: ") and out[-2] == f"appended to {target}"
    assert 0.0 <= float(out[-1].split(":")[1]) <= 100.0
    text = target.read_text()
    assert "## End to end" in text
    stages = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "seconds" not in line]
    assert stages == ["train + eval", "grad-cam", "total"]  # --data given: no synthetic/shard stages
    assert (tmp_path / "work" / "gradcam.png").is_file()
    assert docs_files() == before
