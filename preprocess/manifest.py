"""Read the shard directory that `preprocess.shard` writes: `manifest.json` plus `<split>/*.tar|.idx`.

Consumers (the DALI pipelines, the baseline loader, viz) go through these functions so that a
missing or half-written dataset gives one clear error instead of a reader crash.
"""

from __future__ import annotations

import json
import math
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


def expected_distinct(class_counts: list[int], n: int) -> float:
    """Expected number of distinct classes among `n` samples drawn at random (without replacement)
    from a split with these per-class counts."""
    total = sum(class_counts)
    if n >= total:
        return float(sum(1 for c in class_counts if c))

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    absent = [math.exp(log_choose(total - c, n) - log_choose(total, n)) if total - c >= n else 0.0
              for c in class_counts if c]
    return sum(1.0 - a for a in absent)


def mix_stats(shard_class_counts: list[list[int]]) -> dict:
    """How mixed a split's shards are: distinct classes per shard (mean, min) and the mean a random
    order would give for the same shard sizes."""
    if not shard_class_counts:
        return {"distinct_classes_mean": 0.0, "distinct_classes_min": 0, "distinct_classes_if_random": 0.0}
    totals = [sum(col) for col in zip(*shard_class_counts)]
    distinct = [sum(1 for c in counts if c) for counts in shard_class_counts]
    sizes = [sum(counts) for counts in shard_class_counts]
    expected = {n: expected_distinct(totals, n) for n in set(sizes)}
    return {"distinct_classes_mean": round(sum(distinct) / len(distinct), 3),
            "distinct_classes_min": min(distinct),
            "distinct_classes_if_random": round(sum(expected[n] for n in sizes) / len(sizes), 3)}


def class_sorted_problem(data_dir: str | Path, manifest: dict, split: str = "train") -> str | None:
    """Why the split's shards look class-sorted (too few classes per shard for a random order), or None.

    A random order puts close to `distinct_classes_if_random` classes in every shard; a class-sorted
    one a handful. Manifests written before the mix statistics existed are checked from the per-shard
    summaries that `preprocess.shard` leaves beside the tars."""
    info = manifest["splits"][split]
    mix = info.get("mix")
    if mix is None:
        counts = []
        for shard in info["shards"]:
            summary = Path(data_dir) / split / f"{shard['name']}.json"
            try:
                counts.append(json.loads(summary.read_text())["per_class"])
            except (OSError, ValueError, KeyError):
                return (f"{Path(data_dir) / MANIFEST}: no class-mix statistics and no {summary.name} to compute them; "
                        f"cannot tell whether the {split} shards are shuffled")
        mix = mix_stats(counts)
    expected, mean = mix["distinct_classes_if_random"], mix["distinct_classes_mean"]
    if expected >= 2 and mean < 0.5 * expected:
        return (f"{Path(data_dir) / split}: shards look class-sorted ({mean:.1f} classes per shard on average; a "
                f"random order gives {expected:.1f}), so batches would hold a handful of classes")
    return None
