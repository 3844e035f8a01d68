"""A source item replaced under the same name (a photo, a parquet file, an S3 object) is noticed on a re-run:
exactly the shards it feeds are redone, the run says which and why, and the result is the bytes a fresh run
of the new source gives; an unchanged source still verifies every shard and redoes none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preprocess import shard, synthetic
from preprocess.sources import local_stamp, remote_stamp
from tests.test_shard import _copy_as_folders, shard_cli, tree_bytes

CLASSES, PER_SHARD = 10, 10


def run(src: Path | str, out: Path, lines: list[str] | None = None) -> dict:
    return shard.run(str(src), out, images_per_shard=PER_SHARD, workers=1, progress=False,
                     log=None if lines is None else lines.append)


def shard_keys(out: Path, split: str) -> dict[str, set[str]]:
    """shard name -> the keys of its samples, from the summaries beside the tars."""
    return {p.stem: set(json.loads(p.read_text())["source"]) for p in sorted((out / split).glob("shard-*.json"))}


def tar_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*.tar"))}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {"train": synthetic.generate_split("train", CLASSES, 5, 40, seed=5),
            "val": synthetic.generate_split("val", CLASSES, 5, 40, seed=5)}


def test_replaced_photo_redoes_only_its_shard(rows, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _copy_as_folders(rows, src, tiny=False)
    run(src, out)
    before = tar_state(out)

    assert run(src, out)["_stats"]["written_shards"] == 0  # unchanged: every shard verified, none redone
    assert tar_state(out) == before

    victim = sorted((src / "train").rglob("*.JPEG"))[7]
    stat = victim.stat()
    victim.write_bytes(sorted((src / "train").rglob("*.JPEG"))[31].read_bytes())  # another photo, same name
    # A later time, as a copy made a second later would have (a rewrite within one clock tick of the
    # filesystem, with the same size, is the one change a size+mtime stamp cannot see).
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    holder = next(name for name, keys in shard_keys(out, "train").items() if victim.stem in keys)

    result = shard_cli("--src", src, "--out", out, "--images-per-shard", PER_SHARD, "--workers", 1)
    assert f"train: redoing 1 shard whose source changed since it was written: {holder} ({victim} changed)" \
        in result.stdout
    after = tar_state(out)
    assert [name for name in before if after[name] != before[name]] == [f"train/{holder}.tar"]
    fresh = tmp_path / "fresh"
    run(src, fresh)
    assert tree_bytes(out) == tree_bytes(fresh)  # the new photo is in, byte for byte as a fresh run puts it


def _rewrite(rows: list[dict], path: Path, split_file_name: str) -> None:
    """Rewrite one parquet file of the source with the same keys and labels but other images (each row gets
    its neighbour's bytes), as a re-export that fixed some images would."""
    shifted = [{"image": {"bytes": rows[(i + 1) % len(rows)]["image"]["bytes"], "path": r["image"]["path"]},
                "label": r["label"]} for i, r in enumerate(rows)]
    tmp = path.parent.parent / "rewrite"
    written, = synthetic.write_hf_parquet(shifted, tmp, split_file_name, synthetic.class_names(CLASSES),
                                          rows_per_file=len(rows), rows_per_group=10)
    os.replace(written, path)


def test_rewritten_parquet_file_redoes_the_shards_it_feeds(rows, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    names = synthetic.class_names(CLASSES)
    # 4 rows per train file: a file feeds at most 4 of the 5 train shards.
    train_files = synthetic.write_hf_parquet(rows["train"], src, "train", names, rows_per_file=4, rows_per_group=10)
    val_files = synthetic.write_hf_parquet(rows["val"], src, "validation", names, rows_per_file=20, rows_per_group=10)
    run(src, out)
    before = tar_state(out)
    again = run(src, out)["_stats"]
    assert again["written_shards"] == 0 and again["stale_shards"] == [] and tar_state(out) == before

    # val keeps the source's order: rows 20-39 of the split, the second file, are val shards 2 and 3 exactly.
    _rewrite(rows["val"][20:40], val_files[1], "validation")
    lines: list[str] = []
    stats = run(src, out, lines)["_stats"]
    assert stats["stale_shards"] == ["val/shard-000002", "val/shard-000003"]
    assert stats["written_shards"] == 2 and stats["encoded"] == 20
    assert lines == [f"val: redoing 2 shards whose source changed since they were written: shard-000002 "
                     f"({val_files[1]} changed); shard-000003 ({val_files[1]} changed)"]
    changed = {name for name in before if tar_state(out)[name] != before[name]}
    assert changed == {"val/shard-000002.tar", "val/shard-000003.tar"}

    # train is shuffled: the file's 4 rows are spread over several shards, all of them redone, no other.
    keys = {r["image"]["path"].rsplit(".", 1)[0] for r in rows["train"][:4]}
    fed = sorted(f"train/{name}" for name, held in shard_keys(out, "train").items() if held & keys)
    _rewrite(rows["train"][:4], train_files[0], "train")
    stats = run(src, out)["_stats"]
    assert stats["stale_shards"] == fed and stats["written_shards"] == len(fed) < 5
    fresh = tmp_path / "fresh"
    run(src, fresh)
    assert tree_bytes(out) == tree_bytes(fresh)


def test_stamps_of_cached_and_remote_files(tmp_path):
    # A file in the Hugging Face cache is a link to blobs/<content hash>: a re-download that changes the
    # mtime but not the content keeps the stamp; new content is a new blob, so a new stamp.
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"parquet")
    link = tmp_path / "snapshots" / "main" / "train-00000-of-00001.parquet"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert local_stamp(str(link)) == f"blob={'ab' * 32}"
    os.utime(blob, ns=(0, 10 ** 9))
    assert local_stamp(str(link)) == f"blob={'ab' * 32}"
    plain = tmp_path / "train-00000-of-00001.parquet"
    plain.write_bytes(b"parquet")
    assert local_stamp(str(plain)) == f"size=7,mtime_ns={plain.stat().st_mtime_ns}"
    assert remote_stamp({"name": "b/k", "size": 7, "ETag": '"d41d8cd9"', "LastModified": "x"}) == "etag=d41d8cd9"
    assert remote_stamp({"size": 7, "blob_id": "c0ffee", "lfs": {"sha256": "f00d", "size": 7}}) == "sha256=f00d"
    assert remote_stamp({"size": 7, "mtime": 1700000000.0}) == "size=7,modified=1700000000.0"
