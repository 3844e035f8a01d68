"""viz.plots: a PNG from a small metrics.jsonl; a missing, empty or broken one is a one-line error."""

from __future__ import annotations

import json

from PIL import Image

from viz import plots


def write_metrics(run_dir, epochs: int = 4):
    lines = []
    for e in range(epochs):
        record = {"epoch": e, "train_loss": 6.9 - e, "lr": 0.1 * (e + 1), "resolution": 160 + 32 * (e // 2),
                  "images_per_s": 2000.0 + e, "seconds": 60.0}
        if e % 2 == 1:  # validation every other epoch
            record.update(top1=0.1 * e, top5=0.2 * e)
        lines.append(json.dumps(record))
    lines.append(json.dumps({"epoch": epochs - 1, "train_loss": 1.0, "lr": 0.0, "resolution": 192,
                             "images_per_s": 2100.0, "seconds": 61.0, "top1": 0.5, "top5": 0.8}))  # resumed epoch
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_from_metrics(tmp_path, capsys):
    write_metrics(tmp_path)
    assert plots.main([str(tmp_path)]) == 0
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1500, 800)  # figsize (15, 8) at 100 dpi
    assert "curves.png" in capsys.readouterr().out


def test_last_record_of_an_epoch_wins(tmp_path):
    write_metrics(tmp_path)
    records = plots.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["top1"] == 0.5
    assert plots.series(records, "top1") == ([1, 3], [0.1, 0.5])
    assert plots.as_percent([0.1, 0.5]) == [10.0, 50.0] and plots.as_percent([10.0, 50.0]) == [10.0, 50.0]


def test_custom_output(tmp_path):
    write_metrics(tmp_path, epochs=1)
    out = tmp_path / "figs" / "run.png"
    assert plots.main([str(tmp_path), "--output", str(out)]) == 0
    assert out.stat().st_size > 0


def _error(capsys, argv) -> str:
    assert plots.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_empty_or_broken_metrics(tmp_path, capsys):
    assert "metrics.jsonl: no such file" in _error(capsys, [str(tmp_path)])
    assert "no such directory" in _error(capsys, [str(tmp_path / "nope")])
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert "metrics.jsonl: empty" in _error(capsys, [str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1,\n')
    assert "metrics.jsonl:2: not valid JSON" in _error(capsys, [str(tmp_path)])
    assert not (tmp_path / "curves.png").exists()
