"""viz.plots: a PNG from a small metrics.jsonl; a missing, empty or broken one is a one-line error; whole
epochs at whole ticks, counts in the singular for one, class names on the per-class axis, the printed path
is the file written, and names in any script draw without a warning per character."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from PIL import Image, ImageDraw

from viz import fonts, plots


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


# ----------------------------------------------------------------------------- what the figures say

def _saved(draw, *args):
    with fonts.any_script("test"):
        fig = draw(*args)
        fig.savefig(io.BytesIO(), format="png")  # lays out the ticks as in the PNG
    return fig


@pytest.mark.parametrize("epochs", [1, 2, 4])
def test_whole_epochs_get_whole_ticks(epochs):
    records = [{"epoch": e, "train_loss": 6.9 - e, "top1": 0.1 * e, "lr": 0.1} for e in range(epochs)]
    fig = _saved(plots.draw_curves, records, "run")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    # A run that logs fractional epochs keeps fractional ticks.
    fig = _saved(plots.draw_curves, [{"epoch": 0.5, "lr": 0.1}, {"epoch": 1.0, "lr": 0.2}], "run")
    assert any(not float(t).is_integer() for t in fig.axes[0].get_xticks())


def test_counts_are_singular_for_one(tmp_path):
    assert plots.counted(1, "epoch") == "1 epoch" and plots.counted(2, "epoch") == "2 epochs"
    assert plots.counted(1, "class", "classes") == "1 class" and plots.counted(0, "class", "classes") == "0 classes"
    write_metrics(tmp_path, epochs=1)
    records = plots.read_metrics(tmp_path / "metrics.jsonl")
    assert plots.curves_title(tmp_path, records) == f"{tmp_path.name}: 1 epoch"
    assert plots.draw_curves(records, plots.curves_title(tmp_path, records))._suptitle.get_text().endswith(": 1 epoch")


def test_per_class_chart_names_the_classes_worst_first():
    names = ["tench", "goldfish", "great white shark", "Café crème", "東京タワー"]
    fig = _saved(plots.draw_class_accuracy, names, [0.5, 0.1, 0.9, 0.3, 0.7], "per-class top-1")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["goldfish", "Café crème", "tench", "東京タワー", "great white shark"]
    many = [f"n{i:08d} a class with a rather long name" for i in range(1000)]
    fig = _saved(plots.draw_class_accuracy, many, [i / 1000 for i in range(1000)], "per-class top-1")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 10 <= len(labels) <= plots.MAX_NAMED and labels[0] == plots.short(many[0]) and labels[0].endswith("\u2026")
    with pytest.raises(ValueError, match="3 class names for 2 accuracies"):
        plots.draw_class_accuracy(names[:3], [0.1, 0.2], "x")


def test_printed_output_is_the_file_written(tmp_path, capsys):
    write_metrics(tmp_path, epochs=2)
    (tmp_path / "figs").mkdir()
    for given, written in (("afile", "afile.png"), ("figs", "figs/curves.png"), ("b.PNG", "b.PNG")):
        assert plots.main([str(tmp_path), "--output", str(tmp_path / given)]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == f"wrote {tmp_path / written}" and (tmp_path / written).stat().st_size > 0, given
    assert "expected a .png file name" in _error(capsys, [str(tmp_path), "--output", str(tmp_path / "c.jpg")])
    assert not (tmp_path / "afile").exists() and not (tmp_path / "c.jpg").exists()


def test_any_script_names_without_warnings(tmp_path, capsys, caplog):
    """Accented Latin is drawn by DejaVu Sans; CJK by an installed CJK font, or as boxes with one note: never
    a warning per character or a 'findfont' line per text."""
    names = ["Café crème", "Ærøskøbing", "中文", "日本語のクラス", "한국어"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="matplotlib"):
        warnings.simplefilter("always")
        plots.plot_class_accuracy(names, [0.1, 0.2, 0.3, 0.4, 0.5], tmp_path / "a.png", "多语言 top-1")
        plots.plot_class_accuracy(names[:2], [0.1, 0.2], tmp_path / "b.png", "Café")
    assert [str(w.message) for w in caught] == [] and "findfont" not in caplog.text
    assert fonts.families()[0] == fonts.LATIN
    notes = capsys.readouterr().err.strip().splitlines()
    if fonts.cjk_family():
        assert notes == []
    else:
        assert len(notes) == 1 and "no installed font has '中文日本語のクラス한국어'" in notes[0], notes


def test_pil_font_has_the_glyphs():
    """The Grad-CAM grid's font: accented Latin always, CJK where a CJK font is installed (not the box that
    a missing glyph draws)."""
    face = fonts.pil_font(15)

    def ink(text: str) -> bytes:
        image = Image.new("L", (40, 30))
        ImageDraw.Draw(image).text((5, 5), text, font=face, fill=255)
        return image.tobytes()

    box = ink("\U0010fffd")  # a private-use character no font has
    assert ink("é") not in (box, ink("e")) and ink("Æ") != box
    if fonts.cjk_family():
        assert ink("中") != box
