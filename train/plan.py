"""`python -m train.plan`: how long a training run on AWS takes and what it costs, before you start it.

    python -m train.plan --preset rn50 --epochs 24 --gpu a100 --gpus 8
    python -m train.plan --gpu h100 --gpus 16 --spot-price 30     # two p5.48xlarge at a spot price you looked up

time  = one-time setup (instance + install, HF download, sharding, shard upload to S3; a cached shard set
        only needs its download) + epochs x (train images / rate + val images / (VAL_SPEEDUP x rate))
        + Grad-CAM + interruptions x recovery
cost  = hours x instances x $/h (+ SkyPilot's jobs controller, S3 storage per month)
The training rate comes from docs/BENCHMARKS.md when it has a row for that GPU (a table under an
"end-to-end" or "train" heading with columns `gpu`, `gpus` and `images/s`; the last such row wins), otherwise
from FFCV's published ResNet-50 run. Every rate is labelled by how it was obtained: MEASURED (by this
project, at the size planned), EXTRAPOLATED (measured or published at another size: N GPUs, N cores, and
scaled linearly), PUBLISHED (someone else's run, used as it is) or ASSUMED (a guess, such as H100 = 2x A100).
Prices: the table below, which docs/AWS.md repeats (tests/test_plan.py keeps the two equal).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preprocess.cli import ArgumentParser
from train import config

TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
ALL_IMAGES = TRAIN_IMAGES + VAL_IMAGES  # what preprocess.shard encodes
BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


@dataclass(frozen=True)
class Instance:
    name: str
    gpu: str
    gpus: int  # per instance
    vcpus: int
    nvme_gb: int  # local instance store, all disks
    on_demand: float  # $/h, us-east-1, Linux


# On-demand list prices, us-east-1, Linux, after AWS's June 2025 P4/P5 price cut (p4d was $32.77/h and p5
# $98.32/h before it). Written down on 2026-11-28 from the AWS EC2 on-demand pricing page as we know it,
# cross-checked against a third-party snapshot taken 2026-11-09; not read live: verify before you spend.
PRICES_AS_OF = "2026-11-28"
PRICE_URL = "https://aws.amazon.com/ec2/pricing/on-demand/"
INSTANCES = {
    "a100": Instance("p4d.24xlarge", "A100 40GB", 8, 96, 8000, 21.96),
    "h100": Instance("p5.48xlarge", "H100 80GB", 8, 192, 30720, 55.04),
    "l40s": Instance("g6e.xlarge", "L40S 48GB", 1, 4, 250, 1.861),
    "a10g": Instance("g5.xlarge", "A10G 24GB", 1, 4, 250, 1.006),
}
SPOT_FRACTION = 0.5  # assumed spot price / on-demand price; spot prices move by zone and hour

# Assumed rates, used when docs/BENCHMARKS.md has no measurement.
FFCV_8XA100 = TRAIN_IMAGES * 24 / (21.7 * 60)  # images/s: FFCV rn50, 24 epochs in 21.7 min on 8xA100, 160-192 px
GPU_SPEED = {"a100": 1.0, "h100": 2.0, "l40s": 0.6, "a10g": 0.3}  # per GPU, relative to an A100 (assumed)
MULTI_NODE_EFFICIENCY = 0.9  # DDP across instances over the network, relative to linear (assumed)
VAL_SPEEDUP = 3.0  # evaluation images/s / training images/s (no backward pass) (assumed)
SHARD_RATE_PER_VCPU = 50.0  # images/s per vCPU: decode, resize to <= 500 px, JPEG q90 (assumed)
PROVISION_S = 10 * 60  # instance start, image boot, pip install torch + DALI (assumed)
HF_PARQUET_GB = 155.0  # ILSVRC/imagenet-1k train + validation parquet
HF_MB_PER_S = 200.0  # download rate from Hugging Face (assumed)
SHARDS_GB = 135.0  # ~100 KB per image at <= 500 px, quality 90 (assumed until a real shard set is measured)
S3_MB_PER_S = 500.0  # S3 <-> instance, same region, 16 parallel transfers (assumed)
GRADCAM_S = 2 * 60  # Grad-CAM grid at the end (assumed)
CHECKPOINT_EVERY_S = 15 * 60  # train.main's checkpoint.every_minutes default; also one per epoch
CONTROLLER_PER_H = 0.192  # SkyPilot jobs controller (4 vCPU, 16 GB, e.g. m6i.xlarge) while the job runs
S3_PER_GB_MONTH = 0.023  # S3 Standard, us-east-1, first 50 TB
EBS_PER_GB_MONTH = 0.08  # gp3, us-east-1
EBS_ROOT_GB = 256  # disk_size in deploy/aws/*.yaml
CHECKPOINTS_GB = 0.5  # last.pt + best.pt + model_final.pth, ResNet-50 with optimizer state and EMA
EBS_ROOT_PER_H = EBS_ROOT_GB * EBS_PER_GB_MONTH / 730  # $/h per instance (730 hours a month)


class PlanError(ValueError):
    pass


RATE_KINDS = ("measured", "extrapolated", "published", "assumed")


@dataclass(frozen=True)
class Rate:
    images_per_s: float
    kind: str  # one of RATE_KINDS: how the figure was obtained
    source: str  # starts with the kind in capitals, then where the figure comes from and how it was scaled

    def __post_init__(self):
        if self.kind not in RATE_KINDS:
            raise ValueError(f"Rate.kind {self.kind!r}: expected one of {', '.join(RATE_KINDS)}")

    @property
    def measured(self) -> bool:
        """Measured by this project at the size planned; an extrapolation is not."""
        return self.kind == "measured"


@dataclass
class Plan:
    preset: str
    epochs: int
    instance: Instance
    nodes: int
    rate: Rate
    shard_rate: Rate
    epoch_s: float
    phases: list[tuple[str, float, str]] = field(default_factory=list)  # (what, seconds, how)
    recovery_s: float = 0.0
    spot_price: float = 0.0
    spot_price_assumed: bool = True
    interruptions: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(s for _, s, _ in self.phases)

    def cost(self, price_per_h: float, interruptions: int = 0) -> float:
        """hours x (instances x ($/h + their EBS root) + the jobs controller)."""
        hours = (self.total_s + interruptions * self.recovery_s) / 3600
        return hours * (self.nodes * (price_per_h + EBS_ROOT_PER_H) + CONTROLLER_PER_H)


# -- docs/BENCHMARKS.md ---------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[tuple[str, str, list[dict[str, str]]]]:
    """(heading, section text, rows) for every pipe table; rows map lower-cased header -> cell."""
    tables, heading, section, lines = [], "", [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading, section = line.lstrip("#").strip(), []
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|?\s*:?-{3,}", lines[i + 1].strip()):
            header = [c.strip().lower() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=False)))  # a ragged row keeps what it has
                i += 1
            tables.append((heading, "\n".join(section), rows))
            continue
        section.append(line)
        i += 1
    return tables


def _number(cell: str) -> float | None:
    m = re.search(r"[\d,]+(?:\.\d+)?", cell or "")
    return float(m.group().replace(",", "")) if m else None


def measured_rate(gpu: str, path: Path) -> tuple[float, str, float] | None:
    """(images/s per GPU, where, GPUs it ran on) from the last matching training row of docs/BENCHMARKS.md."""
    if not path.is_file():
        return None
    found = None
    names = "|".join(GPU_SPEED)
    for heading, section, rows in markdown_tables(path.read_text()):
        if not re.search(r"end-to-end|train", heading, re.I) or re.search(r"preprocess", heading, re.I):
            continue
        for row in rows:
            rate = _number(row.get("images/s", ""))
            context = " ".join(row.values()) + " " + section
            kind = (row.get("gpu") or "").lower() or next(
                (g for g in GPU_SPEED if re.search(rf"\b{g}\b", context, re.I)), "")
            count = _number(row.get("gpus", ""))
            if count is None:
                m = re.search(rf"(\d+)\s*[x×]\s*(?:nvidia\s+)?({names})\b", context, re.I)
                count = float(m.group(1)) if m else None
            if rate and count and gpu in kind.lower():
                found = (rate / count, f"{path.name}, \"{heading}\": {rate:,.0f} images/s on {count:g}x {gpu.upper()}",
                         count)
    return found


def measured_shard_rate(path: Path) -> tuple[float, str, int, int | None] | None:
    """(images/s per worker process, where, workers it ran with, cores of that machine or None) from the last
    "Preprocessing" table of docs/BENCHMARKS.md. A table without a `workers` column ran one process; the cores
    are the last "N cores" written above the table (its entry's device line)."""
    if not path.is_file():
        return None
    found = None
    for heading, section, rows in markdown_tables(path.read_text()):
        if re.search(r"preprocess", heading, re.I):
            cores = re.findall(r"(\d+)\s+(?:cores|vCPUs)\b", section)
            for row in rows:
                rate = _number(row.get("images/s per worker", ""))
                if rate:
                    workers = int(_number(row.get("workers", "")) or 1)
                    found = (rate, f"{path.name}, \"{heading}\" ({rate:g} images/s per worker)", workers,
                             int(cores[-1]) if cores else None)
    return found


# -- the estimate ---------------------------------------------------------------------------------------


def training_rate(gpu: str, gpus: int, benchmarks: Path) -> Rate:
    """A rate measured on as many GPUs as planned is used as it is; one from another GPU count is scaled per GPU
    (extrapolated); without one, FFCV's published 8xA100 run (scaled by an assumed speed for another GPU)."""
    per_instance = INSTANCES[gpu].gpus
    nodes = gpus // per_instance
    scale = gpus * (MULTI_NODE_EFFICIENCY if nodes > 1 else 1.0)
    scaling = (f" x {gpus} GPU{'s' if gpus > 1 else ''}"
               + (f" x {MULTI_NODE_EFFICIENCY} multi-node efficiency (assumed)" if nodes > 1 else ""))
    measured = measured_rate(gpu, benchmarks)
    if measured:
        per_gpu, where, count = measured
        if count == gpus:
            return Rate(per_gpu * count, "measured", f"MEASURED here: {where}")
        return Rate(per_gpu * scale, "extrapolated",
                    f"EXTRAPOLATED from {count:g} GPUs: {where}; per GPU{scaling}")
    run = (f"ResNet-50 run (8xA100, 160-192 px, 24 epochs in 21.7 min = {FFCV_8XA100:,.0f} images/s incl. "
           "data loading)")
    if gpu == "a100" and gpus == 8:
        return Rate(FFCV_8XA100, "published", f"PUBLISHED: FFCV's {run}")
    if gpu != "a100":
        return Rate(FFCV_8XA100 / 8 * GPU_SPEED[gpu] * scale, "assumed",
                    f"ASSUMED: FFCV's published {run}; per GPU x {GPU_SPEED[gpu]} for {gpu.upper()} vs A100 "
                    f"(assumed){scaling}")
    return Rate(FFCV_8XA100 / 8 * scale, "extrapolated",
                f"EXTRAPOLATED from 8 GPUs: FFCV's published {run}; per GPU{scaling}")


def sharding_rate(vcpus: int, benchmarks: Path) -> Rate:
    """preprocess.shard's images/s with one worker per vCPU: the per-worker rate measured here, scaled
    linearly to the instance's vCPUs (extrapolated unless it was measured with that many workers)."""
    measured = measured_shard_rate(benchmarks)
    if not measured:
        return Rate(SHARD_RATE_PER_VCPU * vcpus, "assumed",
                    f"ASSUMED: {SHARD_RATE_PER_VCPU:g} images/s per vCPU x {vcpus} vCPUs")
    per_worker, where, workers, cores = measured
    if workers == vcpus:
        return Rate(per_worker * vcpus, "measured", f"MEASURED here: {where} x {vcpus} workers")
    ran = f"{workers} worker{'s' if workers > 1 else ''}"
    origin = f"{cores} cores ({ran})" if cores else ran
    return Rate(per_worker * vcpus, "extrapolated",
                f"EXTRAPOLATED from {origin}: {where} x {vcpus} vCPUs, assuming linear scaling")


def estimate(preset: str = "rn50", epochs: int = 24, gpu: str = "a100", gpus: int | None = None,
             spot_price: float | None = None, interruptions: int = 1, shards_cached: bool = False,
             benchmarks: Path = BENCHMARKS) -> Plan:
    if gpu not in INSTANCES:
        raise PlanError(f"--gpu {gpu}: expected one of {', '.join(INSTANCES)}")
    inst = INSTANCES[gpu]
    gpus = inst.gpus if gpus is None else gpus
    if gpus < 1 or gpus % inst.gpus:
        raise PlanError(f"--gpus {gpus}: {inst.name} has {inst.gpus} {inst.gpu}; use a multiple of {inst.gpus}")
    if epochs < 1:
        raise PlanError(f"--epochs {epochs}: expected at least 1")
    nodes = gpus // inst.gpus
    rate = training_rate(gpu, gpus, benchmarks)
    shard_rate = sharding_rate(inst.vcpus, benchmarks)
    epoch_s = TRAIN_IMAGES / rate.images_per_s + VAL_IMAGES / (VAL_SPEEDUP * rate.images_per_s)
    shards_down_s = SHARDS_GB * 1000 / S3_MB_PER_S
    plan = Plan(preset, epochs, inst, nodes, rate, shard_rate, epoch_s)
    plan.phases.append(("instance + install", PROVISION_S, "assumed"))
    if shards_cached:
        plan.phases.append(("shards from the S3 cache", shards_down_s,
                            f"{SHARDS_GB:g} GB at {S3_MB_PER_S:g} MB/s (assumed)"))
    else:
        plan.phases += [
            ("HF download (one time)", HF_PARQUET_GB * 1000 / HF_MB_PER_S,
             f"{HF_PARQUET_GB:g} GB at {HF_MB_PER_S:g} MB/s (assumed)"),
            ("sharding (one time)", ALL_IMAGES / shard_rate.images_per_s,
             f"{ALL_IMAGES:,} images at {shard_rate.images_per_s:,.0f} images/s ({shard_rate.kind})"),
            ("shards to S3 (one time)", shards_down_s, f"{SHARDS_GB:g} GB at {S3_MB_PER_S:g} MB/s (assumed)"),
        ]
    plan.phases += [
        ("training", epochs * epoch_s, f"{epochs} epochs x {epoch_s:.1f} s ({rate.kind} rate)"),
        ("Grad-CAM grid", GRADCAM_S, "assumed"),
    ]
    # a replacement instance installs, pulls the shards, and redoes on average half a checkpoint interval
    plan.recovery_s = PROVISION_S + shards_down_s + min(epoch_s, CHECKPOINT_EVERY_S) / 2
    plan.spot_price_assumed = spot_price is None
    plan.spot_price = inst.on_demand * SPOT_FRACTION if spot_price is None else spot_price
    plan.interruptions = interruptions
    if preset != "rn50":
        plan.notes.append(f"the rates are for the rn50 recipe (160-192 px); preset {preset} may differ")
    if inst.vcpus < 8:
        plan.notes.append(f"{inst.name} has {inst.vcpus} vCPUs: the CPU side of the data pipeline may limit the "
                          "rate; a larger size of the same family has more vCPUs at the same GPU")
    return plan


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def render(plan: Plan) -> str:
    inst = plan.instance
    lines = [f"Plan: {plan.preset}, {plan.epochs} epochs on {plan.nodes * inst.gpus}x {inst.gpu} "
             f"({plan.nodes}x {inst.name})",
             f"Training rate: {plan.rate.images_per_s:,.0f} images/s  [{plan.rate.source}]",
             f"  per epoch: {TRAIN_IMAGES:,} / {plan.rate.images_per_s:,.0f} + {VAL_IMAGES:,} val / "
             f"({VAL_SPEEDUP:g} x {plan.rate.images_per_s:,.0f}) = {plan.epoch_s:.1f} s",
             f"Sharding rate: {plan.shard_rate.images_per_s:,.0f} images/s  [{plan.shard_rate.source}]",
             "", f"{'phase':<26}{'time':>14}  how"]
    lines += [f"{name:<26}{_hm(s):>14}  {how}" for name, s, how in plan.phases]
    lines += [f"{'total (no interruption)':<26}{_hm(plan.total_s):>14}",
              f"{'each spot interruption':<26}{'+ ' + _hm(plan.recovery_s):>14}  relaunch, install, pull shards, "
              "redo half a checkpoint interval", ""]
    spot_how = "assumed " + f"{SPOT_FRACTION:g} x on-demand" if plan.spot_price_assumed else "--spot-price"
    hours = plan.total_s / 3600
    spot_hours = (plan.total_s + plan.interruptions * plan.recovery_s) / 3600
    lines += [f"{'cost':<26}{'$/h each':>10}{'hours':>8}{'total':>10}",
              f"{'on-demand':<26}{inst.on_demand:>10.4g}{hours:>8.2f}{plan.cost(inst.on_demand):>10.2f}",
              f"{'spot':<26}{plan.spot_price:>10.4g}{spot_hours:>8.2f}"
              f"{plan.cost(plan.spot_price, plan.interruptions):>10.2f}  ({spot_how}, "
              f"{plan.interruptions} interruption(s))",
              f"  totals: {plan.nodes} instance(s), each with a {EBS_ROOT_GB} GB gp3 root (${EBS_ROOT_PER_H:.3f}/h), "
              f"and SkyPilot's jobs controller (${CONTROLLER_PER_H}/h, assumed m6i.xlarge)",
              f"  S3 while the bucket exists: {SHARDS_GB + CHECKPOINTS_GB:g} GB x ${S3_PER_GB_MONTH}/GB-month = "
              f"${(SHARDS_GB + CHECKPOINTS_GB) * S3_PER_GB_MONTH:.2f}/month (delete it when done: docs/AWS.md)",
              f"Prices: {PRICE_URL}, us-east-1 Linux on-demand, as of {PRICES_AS_OF}, not read live: verify them; "
              "spot prices vary by zone and hour (aws ec2 describe-spot-price-history)."]
    lines += [f"Note: {n}" for n in plan.notes]
    return "\n".join(lines)


def preset_epochs(preset: str) -> int:
    data = yaml.safe_load(config.preset_path(preset).read_text()) or {}
    return int(data.get("schedule", {}).get("epochs", 24))


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--preset", default="rn50", help=f"train.main preset ({', '.join(config.presets())}); default rn50")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's schedule.epochs)")
    p.add_argument("--gpu", default="a100", choices=sorted(INSTANCES),
                   help="a100 = p4d.24xlarge, h100 = p5.48xlarge, l40s = g6e.xlarge, a10g = g5.xlarge")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in total (default: one instance's worth)")
    p.add_argument("--spot-price", type=float, default=None,
                   help=f"spot $/h per instance (default: assumed {SPOT_FRACTION:g} x on-demand)")
    p.add_argument("--interruptions", type=int, default=1, help="spot interruptions to budget for (default 1)")
    p.add_argument("--shards-cached", action="store_true", help="the S3 shard cache exists: no download/sharding")
    p.add_argument("--benchmarks", type=Path, default=BENCHMARKS,
                   help="measured rates, read only (default docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.preset not in config.presets():
        p.error(f"--preset {args.preset}: expected one of {', '.join(config.presets())}")
    try:
        plan = estimate(args.preset, args.epochs or preset_epochs(args.preset), args.gpu, args.gpus,
                        args.spot_price, args.interruptions, args.shards_cached, args.benchmarks)
    except PlanError as err:
        p.error(str(err))
    print(render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
