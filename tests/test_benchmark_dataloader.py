"""benchmarks.dataloader runs end to end on tiny synthetic shards; benchmarks.report appends where it should,
and only when asked."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from benchmarks import dataloader, report
from preprocess.manifest import load_manifest, split_shards


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


def test_a_plain_run_prints_the_table_and_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    argv = ["--device", "cpu", "--seconds", "1", "--warmup", "0", "--batch-size", "8", "--res", "32",
            "--threads", "1", "--images", "16", "--max-side", "64"]
    assert dataloader.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s*dali-cpu\s+cpu\s+1\s+32\b", out, re.M), out  # the table's row
    assert re.search(r"^dali-cpu images/s: [0-9.]+$", out, re.M) and "appended to" not in out
    assert docs_files() == before and list(tmp_path.iterdir()) == []


def test_benchmark_prints_the_result_line_and_appends_to_the_report(tmp_path, capsys):
    target = tmp_path / "BENCH.md"
    target.write_text("# Benchmarks\n\n## Preprocessing\n\nolder entry\n")
    argv = ["--device", "cpu", "--seconds", "2", "--warmup", "1", "--batch-size", "8", "--res", "32",
            "--threads", "1", "--images", "24", "--max-side", "96", "--baseline", "--report", str(target)]
    assert dataloader.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"dali-cpu images/s: ([0-9.]+)", lines[-1])
    assert match and float(match.group(1)) > 0
    assert any(line.split()[0] == "torchvision-dataloader" for line in lines)

    text = target.read_text()
    assert text.index("## Preprocessing") < text.index("older entry") < text.index("## Dataloader")
    section = text.split("## Dataloader", 1)[1]
    assert "--baseline" in section and "| pipeline | device | threads | res |" in section
    dali_row = next(line for line in section.splitlines() if line.startswith("| dali-cpu |"))
    assert float(dali_row.split("|")[6].replace(",", "")) == float(match.group(1))
    assert "| torchvision-dataloader | cpu | 1 | 32 |" in section


def test_synthetic_shards_are_a_valid_dataset(tmp_path):
    out = dataloader.write_synthetic_shards(tmp_path, 10, classes=3, max_side=80, per_shard=4)
    manifest = load_manifest(out)
    assert [s["images"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 2]
    assert manifest["splits"]["train"]["per_class"] == [4, 3, 3]
    assert len(split_shards(out, "train")) == 3  # files present with the sizes the manifest states


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        dataloader.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--device", "--res", "--batch-size", "--threads", "--seconds", "--baseline", "--report"):
        assert flag in text
    assert "without it the result is only printed and no file is written" in " ".join(text.split())


def test_bad_flags_are_refused(capsys):
    for argv in (["--seconds", "0"], ["--threads", "0"], ["--res", "160", "4"], ["--hw-decoder-load", "1.5"],
                 ["--build-shards", "-1"], ["--prefetch-depth", "0"]):
        with pytest.raises(SystemExit) as exit_:
            dataloader.parse_args(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m benchmarks.dataloader: error:")


def test_rows_say_how_the_batches_were_made_and_the_build_is_timed_over_many_shards(capsys):
    argv = ["--device", "cpu", "--seconds", "0.5", "--warmup", "0", "--batch-size", "4", "--res", "32",
            "--threads", "1", "--images", "8", "--max-side", "64", "--prefetch-depth", "3", "--build-shards", "40",
            "--hw-decoder-load", "0.5", "0.99"]  # the decoder share means nothing on the CPU: one row, "n/a"
    rows = dataloader.run(dataloader.parse_args(argv), dataloader.write_synthetic_shards(
        __import__("pathlib").Path(__import__("tempfile").mkdtemp()), 8, max_side=64))
    loaders = [r for r in rows if r["pipeline"] == "dali-cpu"]
    assert len(loaders) == 1 and loaders[0]["dtype"] == "float32" and loaders[0]["prefetch"] == 3
    assert loaders[0]["hw decoder load"] == "n/a"
    build = next(r for r in rows if r["pipeline"] == "pipeline-build dali-cpu")
    assert build["shards"] == 40 and build["build s"] > 0 and build["first batch s"] > 0
    assert 0 < build["other Python thread during build, % of its speed"]
    assert dataloader.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^pipeline-build dali-cpu\s+40\s+1\s", out, re.M), out  # a table of its own


def test_report_appends_to_the_end_of_its_section_and_creates_missing_ones(tmp_path, monkeypatch):
    target = tmp_path / "docs" / "B.md"
    monkeypatch.setenv(report.ENV_PATH, str(target))
    report.append_result("Dataloader", [{"pipeline": "a", "images/s": 1234.56}], "cmd one", "cpu")
    report.append_result("Train step", [{"res": 160}], "cmd two", "gpu", notes="some note")
    report.append_result("Dataloader", [{"pipeline": "b", "extra": 0.5}], "cmd three", "cpu")
    text = target.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("## Dataloader") == 1
    assert text.index("cmd one") < text.index("cmd three") < text.index("## Train step") < text.index("cmd two")
    assert "| a | 1,234.6 |" in text and "| b | 0.5 |" in text and "some note" in text


def test_nothing_is_written_without_a_file_named(tmp_path, monkeypatch):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    with pytest.raises(ValueError, match="no file named"):
        report.append_result("Dataloader", [{"pipeline": "a"}], "cmd", "cpu")
    assert docs_files() == before and list(tmp_path.iterdir()) == []
    assert report.report_path(None) is None and report.report_path(tmp_path / "x.md") == tmp_path / "x.md"
    monkeypatch.setenv(report.ENV_PATH, str(tmp_path / "env.md"))  # how benchmarks.gpu_suite collects entries
    assert report.report_path(None) == tmp_path / "env.md" and report.report_path(None, no_report=True) is None


def test_no_report_is_the_default_kept_for_old_command_lines_and_clashes_with_report(capsys):
    args = dataloader.parse_args(["--no-report"])
    assert args.no_report and args.report is None
    with pytest.raises(SystemExit) as exit_:
        dataloader.parse_args(["--report", "x.md", "--no-report"])
    assert exit_.value.code == 2 and "not allowed with argument --report" in capsys.readouterr().err


def test_table_columns_are_the_union_of_the_rows_keys():
    table = report.markdown_table([{"a": 1, "b": 2}, {"a": 3, "c": "x|y"}])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 2 |  |", "| 3 |  | x\\|y |"]


def test_entry_names_date_commit_device_and_command():
    when = dt.datetime(2024, 5, 6, 7, 8, tzinfo=dt.timezone.utc)
    entry = report.format_entry([{"x": 1}], "python -m benchmarks.x", "H100", when=when, commit="abc1234")
    assert entry.startswith("**2024-05-06 07:08 UTC**, commit `abc1234`, device: H100")
    assert "`python -m benchmarks.x`" in entry and "| x |\n|---|\n| 1 |" in entry
    assert re.fullmatch(r"[0-9a-f]{4,}(\+dirty)?|unknown", report.git_commit())
