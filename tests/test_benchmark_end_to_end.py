from benchmarks import end_to_end


def test_end_to_end_times_each_stage_and_records_top1(shards_dir, tmp_path, capsys):
    report = tmp_path / "BENCH.md"
    code = end_to_end.main(["--data", str(shards_dir), "--work", str(tmp_path / "work"), "--report", str(report),
                            "--schedule.epochs=1", "--model.arch=resnet18", "--val.flip_tta=false"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("end-to-end top-1: ")
    assert 0.0 <= float(out[-1].split(":")[1]) <= 100.0
    text = report.read_text()
    assert "## End to end" in text
    stages = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "seconds" not in line]
    assert stages == ["train + eval", "grad-cam", "total"]  # --data given: no synthetic/shard stages
    assert (tmp_path / "work" / "gradcam.png").is_file()
