"""Read the shard directory that `preprocess.shard` writes: `manifest.json` plus `<split>/*.tar|.idx`.

Consumers (the DALI pipelines, the baseline loader, viz) go through these functions so that a
missing or half-written dataset gives one clear error instead of a reader crash.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A shard directory that cannot be used; the message names the path and what to do."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise DatasetError(f"{data_dir}: no such directory; create shards with `python -m preprocess.shard --out {data_dir}`")
    if not path.is_file():
        raise DatasetError(f"{path}: missing; is {data_dir} the --out of `python -m preprocess.shard` (and did it finish)?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); re-run `python -m preprocess.shard`") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def split_shards(data_dir: str | Path, split: str, manifest: dict | None = None) -> list[tuple[Path, Path]]:
    """(tar, idx) paths of one split, in order; checks that every file the manifest lists exists."""
    manifest = manifest or load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{Path(data_dir) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    pairs = []
    for shard in manifest["splits"][split]["shards"]:
        tar = Path(data_dir) / split / f"{shard['name']}.tar"
        idx = tar.with_suffix(".idx")
        for p in (tar, idx):
            if not p.is_file():
                raise DatasetError(f"{p}: listed in the manifest but missing; re-run `python -m preprocess.shard` on the same --out")
        if tar.stat().st_size != shard["bytes"]:
            raise DatasetError(f"{tar}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}; the shard is damaged, delete it and re-run `python -m preprocess.shard`")
        pairs.append((tar, idx))
    if not pairs:
        raise DatasetError(f"{Path(data_dir) / split}: split {split!r} has no shards")
    return pairs


def split_size(manifest: dict, split: str) -> int:
    return int(manifest["splits"][split]["images"])


def class_names(manifest: dict) -> list[str]:
    return [c["name"] for c in manifest["classes"]]
