"""preprocess.shard end to end on parquet in the HF schema, ImageFolder and Tiny-ImageNet layouts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from preprocess import shard
from preprocess.manifest import load_manifest, split_shards
from preprocess.writer import decode_lbl, read_index
from tests.conftest import write_synthetic_parquet

MAX_SIDE = 48  # below the synthetic 64 px, so every image must be resized
ROOT = Path(__file__).resolve().parents[1]


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def odd_rows() -> list[dict]:
    """The kinds of file ImageNet really contains: CMYK and grayscale JPEGs, a PNG, a truncated file."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    good = _encoded(rgb, "JPEG")
    return [
        {"image": {"bytes": _encoded(rgb.convert("CMYK"), "JPEG"), "path": "odd_cmyk.JPEG"}, "label": 1},
        {"image": {"bytes": _encoded(rgb.convert("L"), "JPEG"), "path": "odd_gray.JPEG"}, "label": 2},
        {"image": {"bytes": _encoded(rgb, "PNG"), "path": "odd_png.JPEG"}, "label": 3},
        {"image": {"bytes": good[: len(good) // 3], "path": "odd_truncated.JPEG"}, "label": 4},
    ]


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory):
    src = tmp_path_factory.mktemp("odd-parquet")
    rows = write_synthetic_parquet(src, per_class=6, val_per_class=3, extra_train_rows=odd_rows())
    return src, rows


def read_back(data_dir: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """key -> (label, jpeg bytes) through the `webdataset` library, checking .lbl agrees with .cls."""
    urls = [str(tar) for tar, _ in split_shards(data_dir, split)]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        label = int(sample["cls"].decode())
        assert decode_lbl(sample["lbl"]) == label
        samples[sample["__key__"]] = (label, sample["jpg"])
    return samples


def shard_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "preprocess.shard", "--no-progress", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def shard_bytes(directory: Path) -> dict[str, bytes]:
    """tree_bytes of a split folder with each shard summary's source fingerprints left out: two copies of a
    source (parquet and folders, S3 and local disk) give the same tars and differ only in their files' stamps."""
    files = tree_bytes(directory)
    for name in files:
        if name.endswith(".json"):
            summary = json.loads(files[name])
            assert summary.pop("source"), name
            files[name] = json.dumps(summary).encode()
    return files


@pytest.fixture(scope="module")
def odd_shards(odd_source, tmp_path_factory):
    src, _ = odd_source
    out = tmp_path_factory.mktemp("odd-shards")
    shard.run(str(src), out, settings=shard.EncodeSettings(max_side=MAX_SIDE, quality=90), images_per_shard=16,
              workers=2, progress=False)
    return out


def test_manifest_counts_fixes_and_skips_are_exact(odd_source, odd_shards):
    _, rows = odd_source
    manifest = load_manifest(odd_shards)
    train = manifest["splits"]["train"]
    assert train["source_images"] == len(rows["train"])
    assert train["images"] == len(rows["train"]) - 1
    assert [s["key"] for s in train["skipped"]] == ["odd_truncated"]
    expected = np.bincount([r["label"] for r in rows["train"] if r["image"]["path"] != "odd_truncated.JPEG"],
                           minlength=10)
    assert train["per_class"] == expected.tolist()
    assert sum(s["images"] for s in train["shards"]) == train["images"]
    fixed = {f["key"]: f["fixes"] for f in train["fixed_keys"]}
    assert fixed == {"odd_cmyk": ["mode-cmyk"], "odd_gray": ["mode-l"], "odd_png": ["format-png"]}
    assert train["fixed"]["resized"] == train["images"]
    assert manifest["splits"]["val"]["images"] == len(rows["val"])
    assert [c["name"] for c in manifest["classes"]][:2] == ["red disc", "orange square"]


def test_labels_sizes_and_colour_of_every_stored_image(odd_source, odd_shards):
    _, rows = odd_source
    for split in ("train", "val"):
        source_labels = {r["image"]["path"].rsplit(".", 1)[0]: r["label"] for r in rows[split]}
        stored = read_back(odd_shards, split)
        source_labels.pop("odd_truncated", None)
        assert {k: label for k, (label, _) in stored.items()} == source_labels
        for _, jpeg in stored.values():
            image = Image.open(io.BytesIO(jpeg))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= MAX_SIDE


def test_dali_index_points_at_the_members(odd_shards):
    tar, idx = split_shards(odd_shards, "val")[0]
    data = tar.read_bytes()
    for sample in read_index(idx):
        offset, size = sample["lbl"]
        cls_offset, cls_size = sample["cls"]
        assert decode_lbl(data[offset:offset + size]) == int(data[cls_offset:cls_offset + cls_size])
        jpg_offset, jpg_size = sample["jpg"]
        assert data[jpg_offset:jpg_offset + 2] == b"\xff\xd8"  # JPEG SOI marker


def test_rerun_is_a_verified_no_op(odd_source, odd_shards):
    src, _ = odd_source
    before = {p: p.stat().st_mtime_ns for p in odd_shards.rglob("*.tar")}
    manifest = shard.run(str(src), odd_shards, settings=shard.EncodeSettings(max_side=MAX_SIDE),
                         images_per_shard=16, workers=1, progress=False)
    assert manifest["_stats"]["encoded"] == 0
    assert {p: p.stat().st_mtime_ns for p in odd_shards.rglob("*.tar")} == before


def test_damaged_shard_is_redone_on_rerun(odd_source, tmp_path):
    src, _ = odd_source
    settings = shard.EncodeSettings(max_side=MAX_SIDE)
    shard.run(str(src), tmp_path, settings=settings, images_per_shard=16, workers=1, progress=False)
    clean = tree_bytes(tmp_path)
    victim = tmp_path / "train" / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    manifest = shard.run(str(src), tmp_path, settings=settings, images_per_shard=16, workers=1, progress=False)
    # Only the damaged shard is rewritten, and only its own images are encoded again (4 shards, 4 groups).
    assert manifest["_stats"]["written_shards"] == 1
    assert manifest["_stats"]["encoded"] == 16
    assert tree_bytes(tmp_path) == clean


def test_killed_run_resumes_to_identical_bytes(odd_source, odd_shards, tmp_path):
    src, _ = odd_source
    args = ["--src", src, "--out", tmp_path, "--max-side", MAX_SIDE, "--images-per-shard", 16]
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.shard", "--no-progress", "--workers", "1",
                             *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "train").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    # Killed alive, after a shard was finished: a kill that came too late or too early would prove nothing.
    alive, finished = proc.poll() is None, list((tmp_path / "train").glob("*.json"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive and finished, f"alive {alive}, finished shards {finished}"
    assert not (tmp_path / "manifest.json").exists(), "the run finished before it could be killed"
    shard_cli(*args, "--workers", 2)
    assert tree_bytes(tmp_path) == tree_bytes(odd_shards)  # same bytes as an uninterrupted run


def _copy_as_folders(rows: dict[str, list[dict]], root: Path, tiny: bool) -> None:
    """Lay the parquet rows out as ImageFolder (train/<wnid>/, val/<wnid>/) or Tiny-ImageNet-200."""
    wnids = [f"s{c:08d}" for c in range(10)]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    annotations = []
    for split, split_rows in rows.items():
        for row in split_rows:
            wnid = wnids[row["label"]]
            name = row["image"]["path"]
            if tiny:
                folder = root / "train" / wnid / "images" if split == "train" else root / "val" / "images"
                if split == "val":
                    annotations.append(f"{name}\t{wnid}\t0\t0\t10\t10")
            else:
                folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(row["image"]["bytes"])
    if tiny:
        (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order must not matter
        (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


@pytest.mark.parametrize("layout", ["imagefolder", "tiny-imagenet"])
def test_folder_layouts_match_the_parquet_source(layout, odd_source, odd_shards, tmp_path):
    _, rows = odd_source
    src = tmp_path / "src"
    _copy_as_folders(rows, src, tiny=layout == "tiny-imagenet")
    out = tmp_path / "out"
    shard_cli("--src", src, "--out", out, "--max-side", MAX_SIDE, "--images-per-shard", 16, "--workers", 2)
    manifest, reference = load_manifest(out), load_manifest(odd_shards)
    assert manifest["source"]["format"] == layout
    # One pass from files, two passes from parquet: the same shuffled train shards, byte for byte.
    assert shard_bytes(out / "train") == shard_bytes(odd_shards / "train")
    for split in ("train", "val"):
        assert read_back(out, split) == read_back(odd_shards, split)
        for field in ("images", "per_class", "fixed", "fixed_keys", "skipped"):
            got, want = manifest["splits"][split][field], reference["splits"][split][field]
            if field == "fixed_keys":
                got, want = sorted(got, key=str), sorted(want, key=str)
            assert got == want, field


def test_same_input_gives_identical_bytes_whatever_the_workers(odd_source, odd_shards, tmp_path):
    src, _ = odd_source
    shard.run(str(src), tmp_path, settings=shard.EncodeSettings(max_side=MAX_SIDE), images_per_shard=16,
              workers=1, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(odd_shards)


def _bad_parquet(path: Path) -> Path:
    path.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "y": [1]}), path / "train-00000-of-00001.parquet")
    return path


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such file or directory"),
    ("empty", "folder is empty"),
    ("columns", "without image/label column(s)"),
    ("unwritable", "not writable"),
    ("flag", "--quality 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, needle, synthetic_parquet, tmp_path):
    src, out = synthetic_parquet, tmp_path / "out"
    extra = []
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "columns":
        src = _bad_parquet(tmp_path / "bad")
    elif case == "unwritable":
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "out"  # under a regular file: mkdir fails even as root
    elif case == "flag":
        extra = ["--quality", "0"]
    result = shard_cli("--src", src, "--out", out, *extra, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert str(src) in lines[0] or case in ("unwritable", "flag")
    assert not out.exists() or not any(out.iterdir())


def test_missing_hf_cache_says_how_to_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "preprocess.shard", "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "hf download ILSVRC/imagenet-1k" in result.stderr
    assert "hf auth login" in result.stderr


def test_shards_dir_fixture_matches_its_manifest(shards_dir):
    manifest = load_manifest(shards_dir)
    assert manifest["splits"]["train"]["images"] == 200 and len(manifest["splits"]["train"]["shards"]) == 4
    assert manifest["splits"]["val"]["images"] == 70
    counts = np.bincount([label for label, _ in read_back(shards_dir, "val").values()], minlength=10)
    assert counts.tolist() == manifest["splits"]["val"]["per_class"] == [7] * 10
    assert json.loads((shards_dir / "train" / "shard-000000.json").read_text())["images"] == 50


REAL_SAMPLES = ROOT.parent / "shared" / "data" / "imagenet-samples"


@pytest.mark.skipif(not REAL_SAMPLES.is_dir(), reason=f"{REAL_SAMPLES} absent (real ImageNet JPEGs, not shipped)")
def test_real_imagenet_photos_shard_with_exact_counts(tmp_path):
    """120 real ImageNet JPEGs (grayscale ones, 2400 px ones, names with apostrophes), linked into an
    ImageFolder: every one is stored once, RGB, within --max-side, with its fixes counted."""
    files = sorted(REAL_SAMPLES.glob("*.JPEG"))
    src = tmp_path / "src"
    for f in files:
        folder = src / "train" / f.name.split("_", 1)[0]
        folder.mkdir(parents=True)
        (folder / f.name).symlink_to(f)
    out = tmp_path / "out"
    shard.run(str(src), out, splits=("train",), images_per_shard=32, workers=2, progress=False)
    modes, sides = [], []
    for f in files:
        with Image.open(f) as image:
            modes.append(image.mode)
            sides.append(max(image.size))
    train = load_manifest(out)["splits"]["train"]
    assert train["images"] == len(files) and train["skipped"] == []
    assert train["per_class"] == [1] * len(files)
    assert train["fixed"].get("mode-l", 0) == modes.count("L") > 0
    assert train["fixed"].get("resized", 0) == sum(side > 500 for side in sides) > 0
    stored = read_back(out, "train")
    assert "n03992509_potter_s_wheel" in stored
    for _, jpeg in stored.values():
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.mode == "RGB" and max(image.size) <= 500
    names = {c["wnid"]: c["name"] for c in load_manifest(out)["classes"]}
    assert names["n01443537"] == "goldfish"


def test_unlabelled_test_split_keeps_label_minus_one_and_the_source_order(tmp_path):
    """ILSVRC's HF test split has no labels (-1): `--splits test` stores every image with label -1 in the
    parquet row order, counts no class, and leaves train/val alone."""
    from preprocess import synthetic

    names = synthetic.class_names(10)
    rows = synthetic.generate_split("val", 10, 3, 64, seed=5)
    for row in rows:
        row["label"] = -1
    synthetic.write_hf_parquet(rows, tmp_path / "src", "test", names, rows_per_file=20, rows_per_group=7)
    write_synthetic_parquet(tmp_path / "src", per_class=2, val_per_class=1, size=64)  # train/val beside it
    out = tmp_path / "out"
    shard.run(str(tmp_path / "src"), out, splits=("test",), images_per_shard=8, workers=1, progress=False)
    manifest = load_manifest(out)
    assert list(manifest["splits"]) == ["test"] and not (out / "train").exists()
    test = manifest["splits"]["test"]
    assert test["images"] == len(rows) == 30 and test["per_class"] == [0] * 10 and not test["skipped"]
    assert [s["images"] for s in test["shards"]] == [8, 8, 8, 6]
    stored = read_back(out, "test")
    assert list(stored) == [r["image"]["path"].rsplit(".", 1)[0] for r in rows]  # the source's order
    assert {label for label, _ in stored.values()} == {-1}
