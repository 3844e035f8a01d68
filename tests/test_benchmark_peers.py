"""benchmarks.peers on photo-like JPEG class folders the test writes: ours and torchvision run, give rates and a
ratio, and hand out the same kind of batches; with --writers our shard writer writes them and gives a rate and
bytes per image; a peer that is not installed is skipped with one line; bad --photos is one line and exit 2."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import peers, report
from train import data

pytestmark = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")

CLASSES, PER_CLASS, WIDTH, HEIGHT = 3, 32, 160, 120


def write_photos(root, seed: int = 0) -> None:
    """root/<class>/*.JPEG whose pixels have ImageNet's mean and std per RGB channel: normalised, every
    channel of every loader's output should have a mean near 0 (a BGR or unnormalised output would not)."""
    rng = np.random.default_rng(seed)
    mean, std = np.array(data.MEAN) * 255, np.array(data.STD) * 255
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            coarse = rng.normal(mean, std * 0.9, (HEIGHT // 10, WIDTH // 10, 3))
            smooth = np.stack([np.asarray(Image.fromarray(coarse[..., k].astype(np.float32), mode="F")
                                          .resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)) for k in range(3)], -1)
            pixels = np.clip(smooth + rng.normal(0, 0.3 * std, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=95)
            (folder / f"photo_{i:03d}.JPEG").write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer-photos")
    write_photos(root)
    return root


def test_ours_and_torchvision_run_side_by_side_and_a_missing_peer_is_skipped(photos, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    torch.manual_seed(0)  # the DataLoader workers' augmentation seeds
    rows_file, target = tmp_path / "rows.jsonl", tmp_path / "B.md"
    argv = ["--photos", str(photos), "--repeat", "2", "--threads", "1", "--res", "32", "--rounds", "2",
            "--batch-size", "16", "--cache", str(tmp_path / "cache"), "--json", str(rows_file),
            "--report", str(target)]
    assert peers.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out

    if not _ffcv_importable():  # the test venv has no FFCV: the run goes on without it and says so
        skip = [line for line in out.splitlines() if line.startswith("ffcv: skipped")]
        assert len(skip) == 1 and "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev" in skip[0]
        assert "pip install ffcv" in skip[0]
    assert re.search(r"round 2/2 ours\s+threads 1, 32 px: [\d,]+ img/s", captured.err)  # progress lines

    rows = {row["loader"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    ours, tv = rows["ours"], rows["torchvision"]
    for row in (ours, tv):
        assert row["rounds"] == 2 and len(row["round img/s"]) == 2
        assert 0 < row["min img/s"] <= row["median img/s"] <= row["max img/s"]
        assert row["images per epoch"] == CLASSES * PER_CLASS * 2 // 16 * 16  # whole epochs, last batch dropped
    assert tv["ours / it"] == pytest.approx(ours["median img/s"] / tv["median img/s"], abs=0.01) and tv["ours / it"] > 0
    assert re.search(r"^threads 1, 32 px: ours/torchvision [\d.]+x$", out, re.M)

    # The same work per image: the same batches (shape, dtype, labels) and the same normalisation per channel.
    assert ours["output"] == tv["output"] == "float32 16x3x32x32"
    assert ours["label dtype"] == tv["label dtype"] == "int64"
    for row in (ours, tv):
        assert all(abs(m) < 0.2 for m in row["channel mean"]), row
        assert all(0.4 < s < 1.3 for s in row["channel std"]), row  # ~0.67: the 160 -> 32 px resize averages
    assert np.allclose(ours["channel mean"], tv["channel mean"], atol=0.12)
    assert np.allclose(ours["channel std"], tv["channel std"], rtol=0.15)

    section = target.read_text().split(f"## {peers.SECTION}", 1)[1]
    assert "--repeat 2" in section and "| photos | threads | res | loader |" in section
    assert "--reencode auto" in section and "max_resolution=500, jpeg_quality=90" in section


def _ffcv_importable() -> bool:
    return peers.peer_missing("ffcv") is None


def test_writers_ours_writes_gives_a_rate_and_bytes_and_a_missing_ffcv_is_one_line(photos, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    rows_file, target, cache = tmp_path / "rows.jsonl", tmp_path / "B.md", tmp_path / "cache"
    argv = ["--photos", str(photos), "--writers", "--threads", "1", "--rounds", "2", "--cache", str(cache),
            "--json", str(rows_file), "--report", str(target)]
    assert peers.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out

    rows = {row["writer"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    if not _ffcv_importable():  # the test venv has no FFCV: one line for both of its writers, ours runs alone
        skip = [line for line in out.splitlines() if "skipped" in line]
        assert len(skip) == 1 and skip[0].startswith("ffcv: skipped") and "pip install ffcv" in skip[0]
        assert set(rows) == {"ours-auto", "ours-always"}
        assert re.search(r"^workers 1: no ratios \(ffcv-jpg did not run\)$", out, re.M)
    else:
        assert set(rows) == set(peers.DEFAULT_WRITERS)
        assert rows["ours-auto"]["rate / ffcv-jpg"] > 0 and rows["ours-auto"]["bytes / ffcv-jpg"] > 0
        assert rows["ffcv-jpg"]["image KB/image"] > 0
    assert re.search(r"round 2/2 ours-auto\s+workers 1: [\d,.]+ img/s per worker", captured.err)
    for name in ("ours-auto", "ours-always"):
        row = rows[name]
        assert row["images"] == CLASSES * PER_CLASS and row["rounds"] == 2 and len(row["round img/s per worker"]) == 2
        assert 0 < row["min img/s per worker"] <= row["median img/s per worker"] <= row["max img/s per worker"]
        # The q95 test photos are re-encoded at q90 by both modes: the same bytes; tars, .idx, .json and the
        # manifest come on top of the JPEGs.
        assert 0 < row["image KB/image"] < row["output KB/image"]
        assert row["image bytes"] < row["output bytes"]
    assert rows["ours-auto"]["image bytes"] == rows["ours-always"]["image bytes"]
    assert not (peers.cache_dir(cache, photos, peers.find_photos(photos), 1) / "writers").exists()  # cleaned up

    section = target.read_text().split(f"## {peers.SECTION}", 1)[1]
    assert "--writers" in section and "| photos | workers | writer |" in section
    assert "--max-side 500 --quality 90 --images-per-shard 1000" in section and "jpeg_quality=90" in section


def test_writers_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert peers.main(["--photos", str(tmp_path / "none"), "--writers", "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.peers: error: --photos")
    assert "no such folder" in err[0]
    assert not (tmp_path / "cache").exists()
    for argv in (["--writers", "ffcv-jpg"], ["--writers", "ours-fast"], ["--writers", "--images-per-shard", "0"]):
        with pytest.raises(SystemExit) as exit_:
            peers.parse_args(["--photos", "x", *argv])
        assert exit_.value.code == 2


def test_the_repeated_photos_are_linked_under_distinct_names_and_reused(photos, tmp_path):
    listing = peers.find_photos(photos)
    assert len(listing) == CLASSES * PER_CLASS and listing[0][0] == "n00000000"
    folder = peers.cache_dir(tmp_path, photos, listing, 3)
    entries = peers.link_photos(listing, 3, folder)
    links = [link for link, _ in entries]
    assert len(set(links)) == len(links) == 3 * len(listing)
    assert all(link.is_symlink() and link.resolve().parent.parent == photos.resolve() for link in links)
    assert {label for _, label in entries} == set(range(CLASSES))
    assert peers.cache_dir(tmp_path, photos, listing, 3) == folder != peers.cache_dir(tmp_path, photos, listing, 2)


def test_a_flat_folder_takes_the_class_from_the_name(tmp_path):
    for name in ("n01_a.JPEG", "n01_b's.JPEG", "n02_c.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert [(c, p.name) for c, p in peers.find_photos(tmp_path)] == [("n01", "n01_a.JPEG"),
                                                                     ("n01", "n01_b's.JPEG"), ("n02", "n02_c.jpg")]


@pytest.mark.parametrize("layout", ["missing", "empty", "no-class-folders"])
def test_bad_photos_are_one_line_and_exit_2(tmp_path, capsys, layout):
    root = tmp_path / "photos"
    if layout != "missing":
        root.mkdir()
    if layout == "no-class-folders":
        (root / "notes.txt").write_text("not a photo")
        (root / "empty-class").mkdir()
    assert peers.main(["--photos", str(root), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.peers: error: --photos")
    assert ("no such folder" if layout == "missing" else "no class folders") in err[0]
    assert not (tmp_path / "cache").exists()


def test_too_few_images_for_a_batch_is_one_line(tmp_path, capsys):
    write_photos_small = tmp_path / "photos" / "n0"
    write_photos_small.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(write_photos_small / "a.JPEG")
    assert peers.main(["--photos", str(tmp_path / "photos"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than one batch of 64" in err[0]


def test_help_explains_the_flags_and_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        peers.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--photos", "--repeat", "--threads", "--res", "--rounds", "--epochs", "--peers", "--reencode",
                 "--ffcv-write-mode", "--writers", "--images-per-shard", "--cache", "--json", "--report"):
        assert flag in text
    assert "without it the result is only printed and no file is written" in text
    for argv in (["--photos", "x", "--repeat", "0"], ["--photos", "x", "--threads", "0"],
                 ["--photos", "x", "--res", "4"], ["--photos", "x", "--peers", "ffcv"], []):
        with pytest.raises(SystemExit) as exit_:
            peers.parse_args(argv)
        assert exit_.value.code == 2


def test_cached_shards_are_kept_per_encoder(tmp_path, monkeypatch):
    """Shards in --cache written by another preprocess.encode (or decoder version) are not reused: the folder
    name carries a digest of the encoder's source and its decoders' versions."""
    from preprocess import encode

    source = Path(encode.__file__).read_text()
    same, changed = tmp_path / "same.py", tmp_path / "changed.py"
    same.write_text(source)
    changed.write_text(source.replace("DRAFT_GAP = ", "DRAFT_GAP = 0.5 + "))
    today = peers.encoder_digest()
    monkeypatch.setattr(encode, "__file__", str(same))
    assert peers.encoder_digest() == today
    monkeypatch.setattr(encode, "__file__", str(changed))
    assert peers.encoder_digest() != today
