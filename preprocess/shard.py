"""`python -m preprocess.shard`: ImageNet-1k (HF parquet, ImageFolder, Tiny-ImageNet) -> WebDataset shards.

    python -m preprocess.shard --out /mnt/nvme/shards                 # HF cache, train + val
    python -m preprocess.shard --src ~/tiny-imagenet-200 --out shards
    python -m preprocess.shard --src s3://my-bucket/imagenet-1k/data --out /mnt/nvme/shards

Order of the samples
- train: one seeded pseudo-random permutation of the whole split (samples sorted by SHA-256 of
  "<shuffle seed>:<key>"). It depends only on the keys and the seed: never on the source's order
  (a label-sorted parquet export gives the same shards as a shuffled one) nor on `--workers`.
  The mixing has to be in the shards: DALI's reader only shuffles inside a buffer of a few thousand
  samples per rank, so class-sorted shards would train on batches of a handful of classes.
- val and test: the source's own order (parquet row order; folders: class folder, then file name).

How a shuffled split is written
- Folder sources can read any file at any time, so each shard task reads its own files (one pass).
- Parquet can only be read cheaply in row order (one row costs its whole row group, locally or over
  the network), so a shuffled split takes two passes and reads the source once:
  1. encode: one task per row group reads it, re-encodes its images and writes them, sorted by their
     place in the shuffled order, to `.work/<split>/group-GGG/chunk-NNNNNN.bin`: one file per group
     of consecutive shards (MIX_GROUPS groups); `chunk-NNNNNN.json`, written last, says where each
     sample is. Each worker holds one row group in memory.
  2. mix: one task per shard, in shard order, reads its samples from the chunks (one seek each) and
     writes the tar exactly as the one-pass path would. When a group's last shard is written, the
     group's chunk files are deleted, so the disk holds the shards plus about one group of pass-1
     data (peak ~ (1 + 1/MIX_GROUPS) x the shards), never the split twice.
  Resuming re-encodes only the rows that feed missing shards' groups.

Resume: every shard (and chunk) is planned before any work starts, so its contents do not depend on
the workers or on where an earlier run stopped. A shard or chunk is complete when its `.json` exists
(written last, atomically) and names the same plan; re-running the same command verifies complete
shards by SHA-256 and redoes the rest, so a killed run finishes with the same bytes as an
uninterrupted one. Ctrl-C or SIGTERM stops the workers and exits 75 with a one-line hint; OUT/.work/
holds the train split's pass-1 data of parquet sources, reused on resume and deleted at the end.

Changed sources: a shard's `.json` also records the fingerprint of each sample's source item (size and
mtime of a file, ETag or content hash of a remote or cached parquet file; see preprocess.sources). A
re-run redoes the shards whose source items changed, and says which, even when the keys, labels and
settings are the same; the fingerprints never enter the tars, so unchanged sources keep their bytes.

Exit status: 0 done; 2 bad flag, unreadable source or --out, remote source that cannot be reached or
read (one line on stderr naming it and the fix); 4 the output could not be written (disk full, quota,
permissions; one line with the free space): finished shards are kept; 5 a worker process died (out of memory?): finished
shards are kept, re-run with fewer --workers; 75 (EX_TEMPFAIL, "resume me", as train.main) stopped
by Ctrl-C or SIGTERM: finished shards are kept, re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from preprocess.cli import ArgumentParser
from preprocess import encode
from preprocess.encode import MODES as REENCODE_MODES
from preprocess.encode import NOT_CONVERSIONS, UndecodableImage, reencode
from preprocess.manifest import FORMAT_VERSION, MANIFEST, mix_stats
from preprocess.pool import WorkerDied, Workers
from preprocess.remote import RemoteError, redact
from preprocess.sources import (SampleRef, SourceError, classes_json, describe, open_source, public_url, read_bytes,
                                refs_digest, row_group_images)
from preprocess.writer import ShardWriter, file_sha256, free_bytes, shard_name

SPLITS = ("train", "val", "test")
SHUFFLED_SPLITS = ("train",)
WORK_DIR = ".work"  # pass-1 chunks of two-pass splits; deleted once the manifest is written
# Pass-1 output is cut into this many groups of consecutive shards; each group is deleted as soon as its
# shards are written, so the disk peaks near (1 + 1/MIX_GROUPS) x the shards' size, not twice it.
MIX_GROUPS = 16
EXIT_ERROR = 2
EXIT_WRITE_FAILED = 4  # the output could not be written (disk full, quota, permissions), as train.main's saves
EXIT_WORKER_DIED = 5  # a worker process was lost (killed, out of memory), as train.main's lost rank
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request, re-run the same command to resume (as train.main)


@dataclass(frozen=True)
class EncodeSettings:
    max_side: int = 500  # pixels, longer side (FFCV's ImageNet setting)
    quality: int = 90  # JPEG quality
    reencode: str = "auto"  # "auto"|"keep": store source JPEGs that need no change byte for byte; "always"

    def __post_init__(self):
        if self.reencode not in REENCODE_MODES:
            raise SourceError(f"--reencode {self.reencode}: choose from {', '.join(REENCODE_MODES)}")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    refs: tuple[SampleRef, ...]
    num_classes: int
    settings: EncodeSettings
    out_dir: str

    @property
    def summary_path(self) -> Path:
        return Path(self.out_dir) / self.split / f"{shard_name(self.index)}.json"

    def plan_id(self) -> str:
        return f"{self.settings.digest()}:{refs_digest(list(self.refs))}"

    def source_stamps(self) -> dict[str, str]:
        """key -> fingerprint of the source item each sample is read from."""
        return {r.key: r.stamp for r in self.refs}


@dataclass(frozen=True)
class ChunkTask:
    """Pass 1 of a two-pass split: the rows of one parquet row group, each with its shuffled position.

    Its output is cut by destination: one file per group of consecutive shards
    (`group-GGG/chunk-NNNNNN.bin`), so that a group's files can be deleted as soon as its shards exist."""

    split: str
    index: int
    refs: tuple[SampleRef, ...]  # in the order they are written: by position
    positions: tuple[int, ...]
    num_classes: int
    settings: EncodeSettings
    work_dir: str
    per_group: int  # positions per group of shards
    groups: tuple[int, ...] = ()  # the groups to write in this run: those with shards still missing

    @property
    def summary_path(self) -> Path:
        return Path(self.work_dir) / f"chunk-{self.index:06d}.json"

    def samples(self) -> int:
        """How many of its rows this run encodes: those of `groups`."""
        return sum(1 for p in self.positions if p // self.per_group in self.groups)

    def data_path(self, group: int) -> Path:
        return Path(self.work_dir) / f"group-{group:03d}" / f"chunk-{self.index:06d}.bin"

    def plan_id(self) -> str:
        # The stamp too: chunks left by a run that read an older version of the file must not be reused.
        rows = [(r.key, r.label, p, r.stamp) for r, p in zip(self.refs, self.positions)]
        return f"{self.settings.digest()}:{self.per_group}:{hashlib.sha256(json.dumps(rows).encode()).hexdigest()}"


# An encoded sample: (JPEG bytes, fixes); a str instead is the reason it was skipped.
Outcome = tuple[bytes, list[str]] | str


def shuffle(refs: list[SampleRef], seed: int) -> list[SampleRef]:
    """The split in a pseudo-random order that depends only on the keys and the seed."""
    return sorted(refs, key=lambda r: hashlib.sha256(f"{seed}:{r.key}".encode()).digest())


def plan(refs: list[SampleRef], per_shard: int) -> list[list[SampleRef]]:
    return [refs[i:i + per_shard] for i in range(0, len(refs), per_shard)]


def encode_ref(ref: SampleRef, data: bytes | None, split: str, num_classes: int, settings: EncodeSettings):
    """The outcome of one sample: (jpeg, fixes), or the reason it is skipped. `data=None` reads the bytes."""
    if not (0 <= ref.label < num_classes) and split != "test":
        return f"label {ref.label} outside 0..{num_classes - 1}"
    try:
        result = reencode(read_bytes(ref.location) if data is None else data, max_side=settings.max_side,
                          quality=settings.quality, mode=settings.reencode)
    except UndecodableImage as exc:
        return str(exc)
    return result.jpeg, result.fixes


def write_shard(task: ShardTask, outcomes: Iterable[Outcome] | None = None) -> dict:
    """Write one shard from its samples' outcomes (encoded here from the source when None), then its
    summary; returns the summary. Runs in a worker."""
    if outcomes is None:
        outcomes = (encode_ref(ref, None, task.split, task.num_classes, task.settings) for ref in task.refs)
    writer = ShardWriter(Path(task.out_dir) / task.split, shard_name(task.index))
    per_class = [0] * task.num_classes
    fixed: Counter = Counter()
    fixed_keys: list[dict] = []
    skipped: list[dict] = []
    try:
        for ref, outcome in zip(task.refs, outcomes, strict=True):
            if isinstance(outcome, str):
                skipped.append({"key": ref.key, "reason": outcome})
                continue
            jpeg, fixes = outcome
            writer.write(ref.key, jpeg, ref.label)
            if ref.label >= 0:
                per_class[ref.label] += 1
            fixed.update(fixes)
            conversions = [f for f in fixes if f not in NOT_CONVERSIONS]
            if conversions:
                fixed_keys.append({"key": ref.key, "fixes": conversions})
        info = writer.close() if len(writer) else None
    except BaseException:
        writer.abort()
        raise
    summary = {
        "name": shard_name(task.index), "plan": task.plan_id(), "planned": len(task.refs),
        "images": info.images if info else 0, "bytes": info.bytes if info else 0,
        "sha256": info.sha256 if info else None, "per_class": per_class, "fixed": dict(sorted(fixed.items())),
        "fixed_keys": fixed_keys, "skipped": skipped, "source": task.source_stamps(),
    }
    write_json_atomic(task.summary_path, summary)
    return summary


def encode_chunk(task: ChunkTask) -> dict:
    """Pass 1: encode the rows of one row group that belong to `task.groups`, into one file per group,
    in position order; returns the summary (written last)."""
    first = task.refs[0].location
    images = row_group_images(first[1], first[2])
    rows = list(zip(task.refs, task.positions))
    samples, sizes = [], {}
    for group in task.groups:
        path = task.data_path(group)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".bin.tmp")
        offset = 0
        with open(tmp, "wb") as f:
            for ref, position in rows:
                if position // task.per_group != group:
                    continue
                outcome = encode_ref(ref, images[ref.location[3]] or b"", task.split, task.num_classes,
                                     task.settings)
                if isinstance(outcome, str):
                    samples.append([position, -1, 0, outcome])
                    continue
                jpeg, fixes = outcome
                f.write(jpeg)
                samples.append([position, offset, len(jpeg), fixes])
                offset += len(jpeg)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sizes[str(group)] = offset
    summary = {"plan": task.plan_id(), "groups": sizes, "samples": samples}
    write_json_atomic(task.summary_path, summary)
    return summary


def mix_shard(job: tuple[ShardTask, list[tuple]]) -> dict:
    """Pass 2: write one shard from its samples in the pass-1 chunks. `job` = (task, [(position,
    chunk file, offset, length, fixes or skip reason), ...] in position order)."""
    task, entries = job

    def outcomes() -> Iterator[Outcome]:
        for _, chunk, offset, length, extra in entries:
            if offset < 0:
                yield extra
                continue
            # Opened per sample: a shard draws from ~1000 chunks, more than the usual open-file limit.
            with open(chunk, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            if len(data) != length:
                raise OSError(f"{chunk}: truncated; delete {Path(chunk).parent} and re-run")
            yield data, extra

    return write_shard(task, outcomes())


def _run_job(job) -> tuple[str, object, dict]:
    """Dispatch for the worker pool: ('shard', (split, index), summary) or ('chunk', (split, index), summary)."""
    if isinstance(job, ShardTask):
        return "shard", (job.split, job.index), write_shard(job)
    if isinstance(job, ChunkTask):
        return "chunk", (job.split, job.index), encode_chunk(job)
    task, _ = job
    return "shard", (task.split, task.index), mix_shard(job)


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_summary(task: ShardTask | ChunkTask) -> dict | None:
    """The summary a finished task left, if it was planned exactly like `task`, else None."""
    try:
        summary = json.loads(task.summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("plan") == task.plan_id() else None


def stale_reason(task: ShardTask, summary: dict) -> str | None:
    """Why a shard written from the same plan no longer matches its source items, or None if it does."""
    written = summary.get("source")
    if written is None:
        return "written before source fingerprints were recorded"
    changed = [r for r in task.refs if written.get(r.key) != r.stamp]
    if not changed:
        return None
    items = list(dict.fromkeys(public_url(str(r.location[1])) for r in changed))
    more = f" and {len(items) - 2} more" if len(items) > 2 else ""
    return f"{', '.join(items[:2])}{more} changed"


def completed_summary(task: ShardTask, verify: bool = True) -> dict | None:
    """The summary of an already-written shard of the same plan and the same source items whose tar
    still checks out, else None."""
    summary = read_summary(task)
    if summary is None or stale_reason(task, summary) is not None:
        return None
    if summary["images"] == 0:
        return summary
    tar = task.summary_path.with_suffix(".tar")
    if not tar.is_file() or not tar.with_suffix(".idx").is_file() or tar.stat().st_size != summary["bytes"]:
        return None
    if verify and file_sha256(tar) != summary["sha256"]:
        return None
    return summary


def clean_split_dir(directory: Path, keep: set[str]) -> None:
    """Drop temp files of a killed run and shards that are not part of the current plan."""
    for p in directory.iterdir():
        stem = p.name.split(".", 1)[0]
        if p.name.endswith(".tmp") or (stem.startswith("shard-") and stem not in keep):
            p.unlink()


def clean_work_dir(directory: Path, chunks: int, groups: set[int]) -> None:
    """Drop temp files of a killed run, chunks beyond the current plan and groups no longer needed."""
    def stale(name: str, prefix: str, count: int) -> bool:
        index = name.split(".", 1)[0].removeprefix(prefix)
        return name.endswith(".tmp") or not index.isdigit() or int(index) >= count

    for p in directory.iterdir():
        if p.is_dir():
            if stale(p.name, "group-", 10 ** 6) or int(p.name.removeprefix("group-")) not in groups:
                shutil.rmtree(p)
                continue
            for f in p.iterdir():
                if stale(f.name, "chunk-", chunks):
                    f.unlink()
        elif stale(p.name, "chunk-", chunks):
            p.unlink()


def completed_chunk(task: ChunkTask) -> dict | None:
    """The summary of a pass-1 chunk of the same plan whose files for `task.groups` are whole, else None."""
    summary = read_summary(task)
    if summary is None:
        return None
    for group in task.groups:
        size = summary["groups"].get(str(group))
        path = task.data_path(group)
        if size is None or not path.is_file() or path.stat().st_size != size:
            return None
    return summary


def split_manifest(summaries: list[dict], num_classes: int, order: str) -> dict:
    per_class = [0] * num_classes
    fixed: Counter = Counter()
    for s in summaries:
        per_class = [a + b for a, b in zip(per_class, s["per_class"])]
        fixed.update(s["fixed"])
    return {
        "images": sum(s["images"] for s in summaries),
        "source_images": sum(s["planned"] for s in summaries),
        "order": order,
        "mix": mix_stats([s["per_class"] for s in summaries if s["images"]]),
        "shards": [{k: s[k] for k in ("name", "images", "bytes", "sha256")} for s in summaries if s["images"]],
        "per_class": per_class,
        "fixed": dict(sorted(fixed.items())),
        "fixed_keys": [f for s in summaries for f in s["fixed_keys"]],
        "skipped": [k for s in summaries for k in s["skipped"]],
    }


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SourceError(f"--out {out}: not writable ({exc.strerror or exc}); choose a folder you can write to") from exc


def chunk_tasks(split: str, ordered: list[SampleRef], num_classes: int, settings: EncodeSettings,
                work_dir: Path, per_group: int) -> list[ChunkTask]:
    """One pass-1 task per parquet row group, its rows sorted by their place in `ordered`."""
    position = {ref.key: i for i, ref in enumerate(ordered)}
    source_order = sorted(ordered, key=lambda r: r.location[1:])  # (file, row group, row)
    tasks = []
    for _, group in itertools.groupby(source_order, key=lambda r: r.location[1:3]):
        rows = sorted((position[r.key], r) for r in group)
        tasks.append(ChunkTask(split, len(tasks), tuple(r for _, r in rows), tuple(p for p, _ in rows), num_classes,
                               settings, str(work_dir), per_group))
    return tasks


def mix_jobs(tasks: list[ShardTask], chunks: list[ChunkTask], chunk_summaries: dict[int, dict],
             per_shard: int) -> Iterator[tuple[ShardTask, list[tuple]]]:
    """Pass-2 jobs: each shard task with its samples' places in the chunks, in shuffled order.
    `chunk_summaries` holds every chunk that feeds one of `tasks`."""
    wanted = {t.index for t in tasks}
    entries: dict[int, list[tuple]] = defaultdict(list)
    for index, summary in chunk_summaries.items():
        chunk = chunks[index]
        for position, offset, length, extra in summary["samples"]:
            if position // per_shard in wanted:
                data = str(chunk.data_path(position // chunk.per_group))
                entries[position // per_shard].append((position, data, offset, length, extra))
    for task in tasks:
        found = sorted(entries.pop(task.index, []))
        first = task.index * per_shard
        if [e[0] for e in found] != list(range(first, first + len(task.refs))):
            raise RuntimeError(f"{task.split}/{shard_name(task.index)}: pass-1 chunks do not hold its samples; "
                               f"delete {chunks[0].work_dir} and re-run")
        yield task, found


class Progress:
    """One tqdm bar per phase, with images/s and ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def run(self, pool, jobs: Iterable, total: int, desc: str) -> Iterator[tuple[str, object, dict]]:
        bar = tqdm(total=total, unit="img", disable=not self.enabled or total == 0, desc=desc, dynamic_ncols=True,
                   smoothing=0.05)
        try:
            results = pool.imap_unordered(jobs) if pool is not None else map(_run_job, jobs)
            for kind, where, summary in results:
                bar.update(summary["planned"] if kind == "shard" else len(summary["samples"]))
                yield kind, where, summary
        finally:
            bar.close()


def describe_stale(split: str, stale: list[tuple[int, str]]) -> str:
    """One line naming the shards of `split` that are redone because their source changed, and why."""
    shown = "; ".join(f"{shard_name(i)} ({why})" for i, why in stale[:3])
    more = f"; and {len(stale) - 3} more" if len(stale) > 3 else ""
    noun = "shard whose source changed since it was" if len(stale) == 1 else \
        "shards whose source changed since they were"
    return f"{split}: redoing {len(stale)} {noun} written: {shown}{more}"


def run(src: str | None, out: Path, *, fmt: str = "auto", splits: tuple[str, ...] = ("train", "val"),
        settings: EncodeSettings = EncodeSettings(), images_per_shard: int = 1000, workers: int = 1,
        shuffle_seed: int = 0, progress: bool = True, log=None) -> dict:
    """Shard `src` into `out` and return the manifest (also written to `out/manifest.json`). `log(line)`
    is told which shards are redone because their source changed (before the work starts)."""
    source = open_source(src, fmt)
    missing = [s for s in splits if s not in source.splits()]
    if missing:
        raise SourceError(f"--splits: {','.join(missing)} not in the source (it has {','.join(source.splits())})")
    all_refs = {split: source.refs(split) for split in splits}
    for split, refs in all_refs.items():
        if not refs:
            raise SourceError(f"--src {public_url(str(src))}: split {split!r} has no images")
    check_writable(out)

    num_classes = len(source.classes)
    tasks: dict[str, list[ShardTask]] = {}
    two_pass: dict[str, list[ChunkTask]] = {}
    for split, refs in all_refs.items():
        ordered = shuffle(refs, shuffle_seed) if split in SHUFFLED_SPLITS else refs
        (out / split).mkdir(exist_ok=True)
        shards = plan(ordered, images_per_shard)
        clean_split_dir(out / split, {shard_name(i) for i in range(len(shards))})
        tasks[split] = [ShardTask(split, i, tuple(r), num_classes, settings, str(out)) for i, r in enumerate(shards)]
        if split in SHUFFLED_SPLITS and source.sequential:
            per_group = -(-len(shards) // MIX_GROUPS) * images_per_shard
            two_pass[split] = chunk_tasks(split, ordered, num_classes, settings, out / WORK_DIR / split, per_group)

    summaries: dict[tuple[str, int], dict] = {}
    todo: dict[str, list[ShardTask]] = {}
    stale: dict[str, list[tuple[int, str]]] = {}
    for split, split_tasks in tasks.items():
        for task in split_tasks:
            done = completed_summary(task)
            if done is not None:
                summaries[(split, task.index)] = done
                continue
            todo.setdefault(split, []).append(task)
            written = read_summary(task)
            why = stale_reason(task, written) if written is not None else None
            if why is not None:
                stale.setdefault(split, []).append((task.index, why))
    for split, shards in stale.items():
        if log is not None:
            log(describe_stale(split, shards))

    # Phase 1: one-pass shards and pass-1 chunks of the two-pass splits that still miss shards.
    phase1: list = [t for split, ts in todo.items() if split not in two_pass for t in ts]
    chunk_summaries: dict[str, dict[int, dict]] = {}
    for split, chunks in two_pass.items():
        if split not in todo:
            continue
        work = out / WORK_DIR / split
        work.mkdir(parents=True, exist_ok=True)
        per_group = chunks[0].per_group
        needed = {t.index * images_per_shard // per_group for t in todo[split]}
        clean_work_dir(work, len(chunks), needed)
        chunk_summaries[split] = {}
        for chunk in chunks:
            groups = tuple(sorted(needed & {p // per_group for p in chunk.positions}))
            if not groups:
                continue  # feeds only shards that are already complete
            chunk = replace(chunk, groups=groups)
            done = completed_chunk(chunk)
            if done is not None:
                chunk_summaries[split][chunk.index] = done
            else:
                phase1.append(chunk)
    encoded = sum(t.samples() if isinstance(t, ChunkTask) else len(t.refs) for t in phase1)

    start = time.perf_counter()
    bars = Progress(progress)
    busy = phase1 or any(todo.get(split) for split in two_pass)
    with Workers(workers, _run_job) if workers > 1 and busy else contextlib.nullcontext() as pool:
        desc = "encoding (pass 1 of 2)" if two_pass else "encoding"
        for kind, (split, index), summary in bars.run(pool, phase1, encoded, desc):
            if kind == "shard":
                summaries[(split, index)] = summary
            else:
                chunk_summaries[split][index] = summary
        # Phase 2: the missing shards of the two-pass splits, mixed from their chunks.
        mixing = [t for split in two_pass for t in todo.get(split, [])]
        jobs = itertools.chain.from_iterable(
            mix_jobs(todo[split], two_pass[split], chunk_summaries[split], images_per_shard)
            for split in two_pass if split in todo)
        # A group's pass-1 files go as soon as its last shard is written: the disk holds the shards plus
        # about one group (1/MIX_GROUPS of the split) of pass-1 data, not the split twice.
        group_left = Counter((t.split, t.index * images_per_shard // two_pass[t.split][0].per_group) for t in mixing)
        desc = f"mixing {','.join(two_pass)} (pass 2 of 2)"
        for _, (split, index), summary in bars.run(pool, jobs, sum(len(t.refs) for t in mixing), desc):
            summaries[(split, index)] = summary
            group = index * images_per_shard // two_pass[split][0].per_group
            group_left[(split, group)] -= 1
            if group_left[(split, group)] == 0:
                shutil.rmtree(out / WORK_DIR / split / f"group-{group:03d}", ignore_errors=True)
    elapsed = time.perf_counter() - start

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": describe(source),
        "settings": {**asdict(settings), "images_per_shard": images_per_shard, "shuffle_seed": shuffle_seed},
        "num_classes": num_classes,
        "classes": classes_json(source.classes),
        "splits": {split: split_manifest([summaries[(split, t.index)] for t in split_tasks], num_classes,
                                         "shuffled" if split in SHUFFLED_SPLITS else "source")
                   for split, split_tasks in tasks.items()},
    }
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    written = sum(len(ts) for ts in todo.values())
    manifest["_stats"] = {"seconds": elapsed, "encoded": encoded, "written_shards": written,
                          "verified_shards": sum(len(ts) for ts in tasks.values()) - written,
                          "stale_shards": [f"{split}/{shard_name(i)}" for split, ss in stale.items() for i, _ in ss]}
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m preprocess.shard",
        epilog="Exit status: 0 done; 2 bad flag or input, or a remote source that cannot be reached or read (one "
               "line on stderr with the fix); 4 the output could not be written (disk full, quota, permissions): "
               "finished shards are kept; 5 a worker process died (out of memory?): finished shards are kept, "
               "re-run with fewer --workers; 75 stopped by Ctrl-C or SIGTERM: finished shards are kept, re-run "
               "the same command to resume (OUT/.work/ holds pass-1 data of a parquet train split, reused then "
               "deleted). A re-run also redoes the shards whose source files changed (size, mtime or ETag).",
        description="Convert ImageNet-1k (Hugging Face parquet, ImageFolder or Tiny-ImageNet-200) into WebDataset "
                    "tar shards with DALI index files and a manifest.json. Re-running the same command resumes "
                    "and verifies; the same input and settings give byte-identical shards. The train split is "
                    "written in one seeded global random order whatever the source's order (parquet in two passes, "
                    "the disk peaking near 1.07x the shards' size); val/test keep the source's order.")
    p.add_argument("--out", "--output", dest="out", required=True, type=Path, help="output folder (train/, val/, manifest.json go here)")
    p.add_argument("--src", default=None,
                   help="input: a folder, file or glob of HF parquet files, local or an fsspec URL (s3://bucket/prefix, "
                        "hf://datasets/ILSVRC/imagenet-1k/data), an ImageFolder root or a Tiny-ImageNet-200 "
                        "root (default: ILSVRC/imagenet-1k in the local Hugging Face cache)")
    p.add_argument("--format", default="auto", choices=["auto", "hf-parquet", "imagefolder", "tiny-imagenet"],
                   help="input layout (default: detected from --src)")
    p.add_argument("--max-side", type=int, default=500, help="longer image side after resizing, pixels (default 500; never upscales)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images, 1-100 (default 90)")
    p.add_argument("--reencode", default="auto", choices=REENCODE_MODES,
                   help="auto (default): a source JPEG that already is a baseline RGB JPEG within --max-side, with "
                        "standard chroma subsampling, no EXIF rotation and no finer quantisation than --quality, "
                        "is stored byte for byte (fully decoded first, so broken files are still skipped); the "
                        "manifest counts them as 'passthrough'. keep: the same whatever the source's quality "
                        "(no generation loss; ImageNet's ~q95 files then stay twice as large and slow to decode "
                        "every epoch). always: decode and re-encode every image at --quality")
    p.add_argument("--images-per-shard", type=int, default=1000, help="images per tar shard (default 1000, ~100 MB at 500 px)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel encoding processes (default: all cores)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the train split's global pseudo-random order (default 0); val/test keep the "
                        "source's order")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write: train,val[,test] (default train,val)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args(argv)
    return args


def validate(args: argparse.Namespace) -> tuple[str, ...]:
    if args.max_side < 16:
        raise SourceError(f"--max-side {args.max_side}: must be at least 16 pixels")
    if not 1 <= args.quality <= 100:
        raise SourceError(f"--quality {args.quality}: must be between 1 and 100")
    if args.images_per_shard < 1:
        raise SourceError(f"--images-per-shard {args.images_per_shard}: must be at least 1")
    if args.workers < 1:
        raise SourceError(f"--workers {args.workers}: must be at least 1")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise SourceError(f"--splits {args.splits}: choose from {','.join(SPLITS)}")
    return splits


def write_failure(exc: OSError, out: Path) -> str:
    """One line for an OSError that reached the top: what failed, how much room is left, and what to do."""
    where = exc.filename or out
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    inside = Path(os.path.abspath(where)).is_relative_to(os.path.abspath(out))
    if not full and not inside:  # e.g. a source file that vanished or cannot be read
        return f"could not use {where} ({exc.strerror or exc}); check the source under --src, then re-run"
    try:
        free = f"{free_bytes(out) / 2**30:.2f} GiB free on its disk"
    except OSError:
        free = "free space unknown"
    if full:
        fix = "free space (ImageNet: sharding peaks at ~145 GB, see the README) or pick an --out on a larger disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "pick an --out you can write to"
    else:
        fix = "check the disk under --out"
    return (f"could not write {where} ({exc.strerror or exc}; {free}); {fix}, then re-run the same command: "
            f"finished shards are kept")


def main(argv=None) -> int:
    args = parse_args(argv)
    if encode.simplejpeg is None:
        print(f"preprocess.shard: error: {encode.MISSING_SIMPLEJPEG}", file=sys.stderr)
        return EXIT_ERROR
    # SIGTERM (spot interruption, `kill`) stops the run like Ctrl-C: workers die with the group or are
    # terminated by the parent, and nothing finished is lost. SIGINT is set too: a process started by a script's
    # background job (`cmd &`, nohup under a non-interactive shell) inherits it ignored, and Ctrl-C or
    # `kill -INT` would then be dropped without a word while train.main stops on it.
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        splits = validate(args)
        manifest = run(args.src, args.out, fmt=args.format, splits=splits,
                       settings=EncodeSettings(args.max_side, args.quality, args.reencode),
                       images_per_shard=args.images_per_shard, workers=args.workers, shuffle_seed=args.shuffle_seed,
                       progress=not args.no_progress, log=lambda line: print(line, flush=True))
    except (SourceError, RemoteError) as exc:
        print(f"preprocess.shard: error: {redact(str(exc), args.src)}", file=sys.stderr)
        return EXIT_ERROR
    except WorkerDied as exc:
        print(f"preprocess.shard: error: {exc}; finished shards are kept: re-run the same command to resume, "
              f"with fewer --workers (now {args.workers}) if memory ran out", file=sys.stderr)
        return EXIT_WORKER_DIED
    except OSError as exc:
        print(f"preprocess.shard: error: {write_failure(exc, args.out)}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
        print(f"preprocess.shard: interrupted; finished shards are kept: re-run the same command to resume "
              f"({args.out / WORK_DIR}/ holds pass-1 data of a parquet train split, reused then deleted)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stats = manifest.pop("_stats")
    for split, info in manifest["splits"].items():
        fixes = ", ".join(f"{k} {v}" for k, v in info["fixed"].items() if k != "passthrough") or "none"
        mix = info["mix"]
        print(f"{split}: {info['images']} images in {len(info['shards'])} shards ({info['order']} order, "
              f"{mix['distinct_classes_mean']:.1f} classes per shard on average, min {mix['distinct_classes_min']}); "
              f"kept unchanged: {info['fixed'].get('passthrough', 0)}; fixed: {fixes}; skipped: {len(info['skipped'])}")
    rate = stats["encoded"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    reused = f"; {stats['verified_shards']} shards were already complete (checksums verified)" if stats["verified_shards"] else ""
    print(f"encoded {stats['encoded']} images in {stats['seconds']:.1f} s ({rate:.0f} images/s, "
          f"{args.workers} workers){reused}; manifest: {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
