"""The train split's global shuffle: a label-sorted source gives well-mixed shards, the same bytes as any
other order of the same rows; the manifest reports the mix; a kill in either pass resumes to the same
bytes; train.main refuses class-sorted shards unless told otherwise."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from preprocess import shard, synthetic
from preprocess.manifest import DatasetError, class_sorted_problem, load_manifest, split_shards
from tests.test_shard import shard_bytes, shard_cli, tree_bytes
from tests.conftest import write_synthetic_parquet
from tests.test_train import train_cmd
from train import config
from train.main import check_data

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, PER_SHARD = 10, 60, 50


def write_source(out: Path, train_rows: list[dict], val_rows: list[dict], rows_per_group: int) -> Path:
    names = synthetic.class_names(CLASSES)
    synthetic.write_hf_parquet(train_rows, out, "train", names, rows_per_file=200, rows_per_group=rows_per_group)
    synthetic.write_hf_parquet(val_rows, out, "validation", names, rows_per_file=200, rows_per_group=rows_per_group)
    return out


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {"train": synthetic.generate_split("train", CLASSES, PER_CLASS, 40, seed=3),
            "val": synthetic.generate_split("val", CLASSES, 3, 40, seed=3)}


@pytest.fixture(scope="module")
def sorted_src(rows, tmp_path_factory) -> Path:
    """The rows sorted by label, as a user's own parquet export may well be."""
    by_label = sorted(rows["train"], key=lambda r: (r["label"], r["image"]["path"]))
    return write_source(tmp_path_factory.mktemp("sorted-parquet"), by_label, rows["val"], rows_per_group=40)


@pytest.fixture(scope="module")
def sorted_shards(sorted_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sorted-shards")
    shard.run(str(sorted_src), out, images_per_shard=PER_SHARD, workers=1, progress=False)
    return out


def shard_labels(data_dir: Path, split: str) -> list[list[int]]:
    """The labels of each shard, in stored order, read back through the `webdataset` library."""
    return [[int(s["cls"]) for s in wds.WebDataset([str(tar)], shardshuffle=False)]
            for tar, _ in split_shards(data_dir, split)]


def looks_random(shards: list[list[int]]) -> bool:
    """A bound that a random order of 10 equal classes passes with overwhelming probability and a
    sorted one fails: every full shard holds >= 8 of the 10 classes and none more than 3x its share."""
    for labels in shards:
        if len(labels) < PER_SHARD:
            continue
        counts = np.bincount(labels, minlength=CLASSES)
        if (counts > 0).sum() < 8 or counts.max() > 3 * len(labels) / CLASSES:
            return False
    return True


def test_label_sorted_parquet_gives_mixed_shards(rows, sorted_shards):
    shards = shard_labels(sorted_shards, "train")
    assert sorted(label for s in shards for label in s) == sorted(r["label"] for r in rows["train"])
    assert looks_random(shards)
    # The same bound fails on the source's own order, cut into shards the same way.
    source_order = sorted(r["label"] for r in rows["train"])
    assert not looks_random([source_order[i:i + PER_SHARD] for i in range(0, len(source_order), PER_SHARD)])


def test_manifest_reports_the_order_and_the_mix(sorted_shards):
    manifest = load_manifest(sorted_shards)
    assert manifest["settings"]["shuffle_seed"] == 0
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["order"] == "shuffled" and val["order"] == "source"
    mix = train["mix"]
    counts = [np.count_nonzero(np.bincount(s, minlength=CLASSES)) for s in shard_labels(sorted_shards, "train")]
    assert mix["distinct_classes_min"] == min(counts)
    assert mix["distinct_classes_mean"] == pytest.approx(np.mean(counts), abs=1e-3)
    assert 9.9 < mix["distinct_classes_if_random"] <= 10  # 50 draws from 10 classes of 60 miss one rarely
    assert class_sorted_problem(sorted_shards, manifest) is None
    assert not (sorted_shards / shard.WORK_DIR).exists(), "pass-1 chunks must be deleted once the shards are done"


def test_source_order_and_row_groups_do_not_change_the_bytes(rows, sorted_shards, tmp_path):
    # The generator's own (shuffled) order, in smaller row groups: a different source order, same rows.
    src = write_source(tmp_path / "src", rows["train"], rows["val"], rows_per_group=25)
    out = tmp_path / "out"
    shard.run(str(src), out, images_per_shard=PER_SHARD, workers=2, progress=False)
    assert shard_bytes(out / "train") == shard_bytes(sorted_shards / "train")


def test_the_shuffle_seed_changes_the_order_not_the_contents(sorted_src, sorted_shards, tmp_path):
    shard_cli("--src", sorted_src, "--out", tmp_path, "--images-per-shard", PER_SHARD, "--shuffle-seed", 1,
              "--workers", 1)
    assert shard_labels(tmp_path, "train") != shard_labels(sorted_shards, "train")
    a, b = load_manifest(tmp_path)["splits"]["train"], load_manifest(sorted_shards)["splits"]["train"]
    assert a["per_class"] == b["per_class"] and load_manifest(tmp_path)["settings"]["shuffle_seed"] == 1
    assert tree_bytes(tmp_path / "val") == tree_bytes(sorted_shards / "val")  # val keeps the source order


@pytest.mark.parametrize("phase,marker", [("encode", ".work/train/chunk-*.json"), ("mix", "train/shard-*.json")])
def test_kill_in_either_pass_resumes_to_identical_bytes(phase, marker, rows, sorted_src, tmp_path):
    per_shard = 10  # many small shards: the mix pass lasts long enough to be killed in
    reference = tmp_path / "reference"
    shard.run(str(sorted_src), reference, images_per_shard=per_shard, workers=1, progress=False)
    out = tmp_path / "out"
    args = ["--src", sorted_src, "--out", out, "--images-per-shard", per_shard]
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.shard", "--no-progress", "--workers", "1",
                             *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob(marker)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    alive, seen = proc.poll() is None, list(out.glob(marker))  # killed alive, in the pass that was asked for
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive and seen, f"alive {alive}, {marker}: {seen}"
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    if phase == "encode":
        assert not list(out.glob("train/shard-*.json")), "killed too late: the mix pass had begun"
    resumed = shard_cli(*args, "--workers", 2)
    assert tree_bytes(out) == tree_bytes(reference)
    encoded = int(re.search(r"encoded (\d+) images", resumed.stdout).group(1))
    if phase == "encode":  # finished chunks are kept: at least the one that was seen is not encoded again
        assert encoded <= len(rows["train"]) + len(rows["val"]) - 40
    else:  # every chunk was finished: nothing is encoded again
        assert encoded == 0


def _class_sorted_shards(src: Path, out: Path, monkeypatch) -> Path:
    """Shards of `src` whose train split is written in label order, as other tools (or older versions
    of this one) may have written them: through the real writer, only the order function replaced."""
    monkeypatch.setattr(shard, "shuffle", lambda refs, seed: sorted(refs, key=lambda r: (r.label, r.key)))
    shard.run(str(src), out, images_per_shard=PER_SHARD, workers=1, progress=False)
    monkeypatch.undo()
    return out


def test_train_main_refuses_class_sorted_shards(sorted_src, tmp_path, monkeypatch):
    data = _class_sorted_shards(sorted_src, tmp_path / "shards", monkeypatch)
    manifest = load_manifest(data)
    problem = class_sorted_problem(data, manifest)
    assert problem and "class-sorted" in problem

    # A manifest from before the mix statistics: computed from the per-shard summaries instead.
    for info in manifest["splits"].values():
        del info["mix"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert class_sorted_problem(data, load_manifest(data)) == problem

    proc = subprocess.run(train_cmd(data, tmp_path / "run", "--schedule.epochs=1"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "class-sorted" in lines[0] and "--data.allow_unshuffled=true" in lines[0], proc.stderr
    assert "preprocess.shard" in lines[0] and not (tmp_path / "run").exists()


def test_allow_unshuffled_trains_anyway_with_a_warning(sorted_src, tmp_path, monkeypatch, capsys):
    data = _class_sorted_shards(sorted_src, tmp_path / "shards", monkeypatch)
    with pytest.raises(DatasetError, match="class-sorted"):
        check_data(data, allow_unshuffled=False)
    assert check_data(data, allow_unshuffled=True)["num_classes"] == CLASSES
    assert "warning" in capsys.readouterr().err
    assert config.resolve("smoke", ["data.allow_unshuffled=true"]).data.allow_unshuffled is True


def test_unknown_mix_is_refused_with_the_reason(sorted_shards, tmp_path):
    manifest = load_manifest(sorted_shards)
    del manifest["splits"]["train"]["mix"]
    (tmp_path / "train").mkdir()  # the tars are elsewhere; no per-shard summaries here
    problem = class_sorted_problem(tmp_path, manifest)
    assert problem and "cannot tell" in problem


def test_pass_one_data_is_deleted_a_sixteenth_at_a_time(tmp_path, monkeypatch):
    """README: the parquet train split is mixed from pass-1 data in `.work/`, which is deleted one group
    (1/16 of the split) at a time as soon as that group's shards are written, so the disk never holds the
    split twice."""
    src = tmp_path / "src"
    write_synthetic_parquet(src, per_class=16, val_per_class=1, size=48)  # 160 train images
    out = tmp_path / "out"
    work = out / shard.WORK_DIR / "train"
    events = []
    real_rmtree = shard.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.parent == work and path.name.startswith("group-"):
            written = sorted(int(p.stem.removeprefix("shard-")) for p in (out / "train").glob("shard-*.json"))
            left = sorted(p.name for p in work.glob("group-*"))
            work_bytes = sum(p.stat().st_size for p in work.rglob("*.bin"))
            events.append((path.name, written, left, work_bytes))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shard.shutil, "rmtree", rmtree)
    shard.run(str(src), out, splits=("train",), images_per_shard=5, workers=1, progress=False)  # 32 shards
    assert [name for name, *_ in events] == [f"group-{g:03d}" for g in range(shard.MIX_GROUPS)] == \
        [f"group-{g:03d}" for g in range(16)]
    first_bytes = events[0][3]
    for g, (name, written, left, work_bytes) in enumerate(events):
        assert written == list(range(2 * g + 2)), name  # deleted right after its 2 shards, before the next group's
        assert left == [f"group-{h:03d}" for h in range(g, 16)]  # the later groups are still there
        assert work_bytes <= first_bytes * (16 - g) / 16 * 1.3  # about a sixteenth less each time
    assert not work.exists() and load_manifest(out)["splits"]["train"]["images"] == 160
