"""`python -m benchmarks.proxy`: does the recipe learn real photos? ResNet-50 from scratch on Imagenette.

    python -m benchmarks.proxy --src ../shared/data/imagenette-144 --device cuda            # 5 and 20 epochs, 128 px
    python -m benchmarks.proxy --shards SHARDS --device cpu                                  # the 2-core protocol
    python -m benchmarks.proxy --src DIR --device cpu --ablate blurpool,label_smoothing,ema,progressive --seeds 0 1 2

Stages, each as a user would run it: `preprocess.shard` turns the ImageFolder into WebDataset shards (skipped
with --shards), then one `python -m train.main --config imagenette` run per epoch count (and per ablation),
then `python -m viz.plots` draws each run's curves. The table (top-1, top-5, wall time, training images/s)
sits beside the fastai Imagenette leaderboard at 128 px and is printed with the per-epoch top-1 curve of
every run; `--report FILE` appends both as an entry (docs/BENCHMARKS.md keeps the ones worth keeping);
OUT/proxy.json keeps the same results for scripts.

Protocols (each a default, any flag or `--section.key=value` override wins):
  cuda  5 and 20 epochs, resolution ramp 96 -> 128 px, every image of train, validation each epoch: the
        leaderboard's setting (85.77 % at 5 epochs, 91.57 % at 20; their images are not squashed, ours are).
  cpu   3 epochs, 32 then 48 px, a class-balanced 300 images per class of train and 100 per class of val
        (with --src; --shards are used as they are), validation after epochs 2 and 3: 10-30 minutes on 2
        shared CPU cores. It checks that the recipe learns real photos (chance is 10 %), not the leaderboard.
Ablations: blurpool, label_smoothing and progressive each train one more run with that element switched
off; ema costs no run, because every EMA run also validates its raw weights (top1_raw in metrics.jsonl).
Seeds: `--seeds 0 1 2` trains every run once per seed (`--run.seed`: weight init, data order, augmentation)
and adds a table of each variant's mean, range and difference from the recipe: on short protocols two seeds
of the same recipe can differ by several points, so an ablation means something only beyond that spread.
Runs named for seed 0 keep their old names (e3, e3-blurpool-off); other seeds add -seedN.
A run whose folder already holds its model_final.pth and every epoch's metrics is reported, not trained
again, so adding a seed or an ablation to an earlier command trains only the new runs; a finished run
trained with other settings (another --optim.lr_per_256, say) is refused rather than reported.
"""

from __future__ import annotations

import argparse
import json
import hashlib
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, report_path

PRESET = "imagenette"
RES_MULTIPLE = 16  # pixels; the preset's schedule.res_multiple
# fastai Imagenette leaderboard, 128 px, xresnet50 variants (top-1 %, by epochs), on un-squashed images.
LEADERBOARD_128 = {5: 85.77, 20: 91.57, 80: 93.55}
ABLATIONS = ("blurpool", "label_smoothing", "ema", "progressive")


@dataclass(frozen=True)
class Protocol:
    epochs: tuple[int, ...]
    res: int  # final training and validation resolution, pixels
    overrides: tuple[str, ...]  # train.main overrides this protocol adds to the preset
    train_per_class: int | None = None  # images per class kept from the source's train split (None: all)
    val_per_class: int | None = None


PROTOCOLS = {
    "cuda": Protocol(epochs=(5, 20), res=128, overrides=()),
    # Validating 3,925 images twice (EMA and raw weights) with flip-TTA costs about half an epoch on 2 cores.
    "cpu": Protocol(epochs=(3,), res=48, overrides=("--val.every_epochs=2",), train_per_class=300,
                    val_per_class=100),
}


class ProxyError(ValueError):
    """A command line or input the benchmark cannot use; the message is one line for the user."""


def res_min_for(res: int, multiple: int = RES_MULTIPLE) -> int:
    """Start of the resolution ramp: 3/4 of the final resolution, on the preset's grid (128 -> 96, 64 -> 48)."""
    return max(multiple, round(0.75 * res / multiple) * multiple)


def ablation_overrides(name: str, res: int) -> list[str]:
    """train.main overrides that switch one recipe element off (`ema` needs no run of its own)."""
    if name == "blurpool":
        return ["--model.blurpool=false"]
    if name == "label_smoothing":
        return ["--optim.label_smoothing=0"]
    if name == "progressive":
        return [f"--schedule.res_min={res}"]  # the final resolution from the first epoch
    if name == "ema":
        return []
    raise ProxyError(f"--ablate {name}: choose from {', '.join(ABLATIONS)}")


def train_argv(shards: Path, run_dir: Path, *, epochs: int, res: int, device: str, threads: int,
               extra: list[str]) -> list[str]:
    """The train.main command line of one run; `extra` (protocol, ablation, user overrides) comes last and wins."""
    return ["--data", str(shards), "--out", str(run_dir), "--config", PRESET, f"--schedule.epochs={epochs}",
            f"--schedule.res_min={res_min_for(res)}", f"--schedule.res_max={res}", f"--val.res={res}",
            f"--run.device={device}", f"--data.num_threads={threads}", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    """One record per epoch from RUN_DIR/metrics.jsonl (a resumed run may repeat an epoch: the last wins)."""
    by_epoch = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def summarize(metrics: list[dict], *, name: str, res: int, wall_seconds: float, resumed: bool | str,
              raw_weights: bool = False) -> dict:
    """One table row from a finished run's metrics; `raw_weights` reads the EMA run's raw-weight top-1."""
    evaluated = [m for m in metrics if "top1" in m]
    if not evaluated:
        raise ProxyError(f"run {name}: no validated epoch in metrics.jsonl")
    last = evaluated[-1]
    key = "top1_raw" if raw_weights else "top1"
    if key not in last:
        raise ProxyError(f"run {name}: metrics.jsonl has no {key} (is ema.enabled on?)")
    epochs = metrics[-1]["epoch"]
    train_seconds = sum(m["seconds"] for m in metrics)
    images = sum(m["images_per_s"] * m["seconds"] for m in metrics)
    board = LEADERBOARD_128.get(epochs) if res == 128 else None
    return {
        "run": name, "epochs": epochs, "train px": f"{metrics[0]['resolution']}->{metrics[-1]['resolution']}",
        "val px": res, "top-1 %": f"{100 * last[key]:.1f}",
        "top-5 %": "" if raw_weights else (f"{100 * last['top5']:.1f}" if "top5" in last else "n/a"),
        "fastai 128 px top-1 %": board if board is not None else "-",
        "wall s": _wall(wall_seconds, resumed, raw_weights),
        "train images/s": round(images / max(train_seconds, 1e-9), 1),
    }


def _wall(seconds: float, resumed: bool | str, raw_weights: bool):
    """resumed: True (continued from last.pt), "earlier" (finished before this command: epochs' seconds only)."""
    if raw_weights:
        return "same run"
    if resumed == "earlier":
        return f"{seconds:.1f} (earlier run, epochs only)"
    return f"{seconds:.1f} (resumed)" if resumed else round(seconds, 1)


def curve(metrics: list[dict], key: str = "top1") -> str:
    """`epoch:top-1%` for every validated epoch, e.g. "2:41.3 4:58.9"."""
    return " ".join(f"{m['epoch']}:{100 * m[key]:.1f}" for m in metrics if key in m)


def describe_shards(shards: Path) -> str:
    """`N train / M val images, K classes (shards: PATH)` from the shards' manifest.json."""
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    counts = " / ".join(f"{info['images']:,} {split}" for split, info in manifest["splits"].items())
    return f"{counts} images, {manifest['num_classes']} classes (shards: {shards}, source {manifest['source']['path']})"


def run_name(epochs: int, label: str, seed: int) -> str:
    """e3, e3-blurpool-off, e3-seed1, e3-label-smoothing-off-seed2 (seed 0 keeps the unsuffixed name)."""
    name = f"e{epochs}" + ("" if label == "recipe" else "-" + label.removeprefix("no ").replace("_", "-") + "-off")
    return name + (f"-seed{seed}" if seed else "")


def finished_metrics(run_dir: Path, epochs: int) -> list[dict] | None:
    """The metrics of a run that ended (model_final.pth written, metrics.jsonl reaching its last epoch), else None."""
    if not (run_dir / "model_final.pth").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return None
    metrics = read_metrics(run_dir)
    return metrics if metrics and metrics[-1]["epoch"] == epochs else None


def changed_settings(run_dir: Path, argv_run: list[str]) -> list[str]:
    """`key: stored -> wanted` for every learning setting where the finished run in `run_dir` differs from
    what `argv_run` would train; empty when the run is the one this command asks for."""
    import yaml

    from train import config, main as train_main

    args, overrides = train_main.parse_args(argv_run)
    wanted = config.resolve(args.config, overrides)
    stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    # settings that change how fast a run goes, not what it learns: a finished run still counts when they differ
    return config.differences(stored, wanted, ignore=config.RESUME_SAFE)


def seed_summary(results: list[dict]) -> list[dict]:
    """Per epoch count and variant: top-1 over the seeds (mean, min-max, each seed) and the mean's
    difference from the recipe's; the raw-weights variant reads top1_raw of the recipe runs."""
    import statistics

    by_variant: dict[tuple[int, str], dict[int, float]] = {}
    for r in results:
        last = [m for m in r["metrics"] if "top1" in m][-1]
        by_variant.setdefault((r["epochs"], r["variant"]), {})[r["seed"]] = 100 * last["top1"]
        if r["variant"] == "recipe" and "top1_raw" in last:
            by_variant.setdefault((r["epochs"], "no ema: raw weights"), {})[r["seed"]] = 100 * last["top1_raw"]
    rows = []
    for (epochs, variant), per_seed in by_variant.items():
        recipe = by_variant.get((epochs, "recipe"), {})
        mean = statistics.fmean(per_seed.values())
        shared = sorted(set(per_seed) & set(recipe))
        delta = statistics.fmean(per_seed[s] - recipe[s] for s in shared) if shared else None
        rows.append({"epochs": epochs, "variant": variant, "seeds": len(per_seed),
                     "top-1 % mean": f"{mean:.1f}",
                     "min-max": f"{min(per_seed.values()):.1f}-{max(per_seed.values()):.1f}",
                     "vs recipe, mean of same-seed differences": "" if variant == "recipe" or delta is None
                     else f"{delta:+.1f}",
                     "per seed": " ".join(f"{s}:{v:.1f}" for s, v in sorted(per_seed.items()))})
    return rows


def run_command(args: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    code = subprocess.run([sys.executable, *args], env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    return code, time.perf_counter() - start


def balanced_subset(src: Path, out: Path, per_class: dict[str, int | None]) -> Path:
    """An ImageFolder of symlinks into `src` with at most per_class[split] images of every class (None: all).

    Which images: the first N by SHA-1 of the file name, a fixed choice that does not follow the file
    names' order. The folder is rebuilt on every call; it holds links only, never image bytes.
    """
    from preprocess.sources import _split_dir, image_files

    if out.exists():
        shutil.rmtree(out)
    for split, limit in per_class.items():
        folder = _split_dir(src, split)
        if folder is None:
            raise ProxyError(f"--src {src}: no {split}/ folder; expected {split}/<wnid>/*.JPEG")
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            files = sorted(image_files(class_dir), key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
            target = out / split / class_dir.name
            target.mkdir(parents=True)
            for path in files[:limit]:
                (target / path.name).symlink_to(path.resolve())
    return out


def make_shards(src: Path, out: Path, workers: int, per_class: dict[str, int | None]) -> tuple[Path, float]:
    from preprocess import shard
    from preprocess.sources import SourceError

    start = time.perf_counter()
    try:
        if any(n is not None for n in per_class.values()):
            src = balanced_subset(src, out.parent / "subset", per_class)
        shard.run(str(src), out, fmt="imagefolder", workers=workers)
    except SourceError as exc:
        raise ProxyError(str(exc)) from exc
    return out, time.perf_counter() - start


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]) +
                                "\nAny --section.key=value argument is passed on to every train.main run.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", type=Path, help="ImageFolder root (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) to shard")
    source.add_argument("--shards", type=Path, help="existing shards of it (python -m preprocess.shard output)")
    p.add_argument("--device", choices=sorted(PROTOCOLS), default=None,
                   help="cuda (the leaderboard protocol) or cpu (the 2-core protocol); default: cuda if available")
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="one run per epoch count (cuda: 5 20, cpu: 3)")
    p.add_argument("--res", type=int, default=None, help=f"final training and validation resolution, pixels, "
                   f"a multiple of {RES_MULTIPLE} (cuda: 128, cpu: 48)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="with --src: keep this many images per class of train (cpu: 300, cuda: all; 0: all)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="with --src: keep this many images per class of val (cpu: 100, cuda: all; 0: all)")
    p.add_argument("--ablate", default="", help=f"comma-separated recipe elements to switch off, one run each: "
                   f"{','.join(ABLATIONS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="train every run once per seed (--run.seed) and summarise mean and spread (default: 0)")
    p.add_argument("--out", "--output", dest="out", type=Path, default=None, help="work folder: shards/, runs/, proxy.json (default runs/proxy-DEVICE)")
    p.add_argument("--threads", type=int, default=None, help="DALI threads (default: the preset's 8 on cuda, all cores on cpu)")
    add_report_flags(p)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=", 1)[0] and "=" in o)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (train.main overrides look like --optim.lr_per_256=0.4)")
    return args, overrides


def _pick(flag: int | None, default: int | None) -> int | None:
    """The flag if given (0 meaning all images), else the protocol's default."""
    if flag is None:
        return default
    if flag < 0:
        raise ProxyError(f"images per class: {flag} must be >= 0 (0: all)")
    return flag or None


def resolve_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        return run_proxy(args, overrides, argv)
    except ProxyError as exc:
        print(f"benchmarks.proxy: error: {exc}", file=sys.stderr)
        return 2


def run_proxy(args: argparse.Namespace, overrides: list[str], argv: list[str] | None) -> int:
    device = resolve_device(args.device)
    protocol = PROTOCOLS[device]
    epochs_list = args.epochs or list(protocol.epochs)
    res = args.res or protocol.res
    if res % RES_MULTIPLE or res < RES_MULTIPLE:
        raise ProxyError(f"--res {res}: must be a positive multiple of {RES_MULTIPLE} pixels")
    if any(e < 1 for e in epochs_list):
        raise ProxyError(f"--epochs {' '.join(map(str, epochs_list))}: every count must be at least 1")
    ablations = [a.strip() for a in args.ablate.split(",") if a.strip()]
    for name in ablations:
        ablation_overrides(name, res)  # rejects unknown names before any work
    if any(o.split("=", 1)[0] == "--run.seed" for o in overrides):
        raise ProxyError("--run.seed: use --seeds (the runs are named and summarised per seed)")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise ProxyError(f"--seeds {' '.join(map(str, args.seeds))}: distinct seeds >= 0")
    threads = args.threads or (8 if device == "cuda" else os.cpu_count() or 1)
    out = args.out or Path("runs") / f"proxy-{device}"
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    from benchmarks.report import git_commit

    commit = git_commit()  # the code that runs: a commit made while the runs train must not be credited

    stages = []
    if args.src is not None:
        per_class = {"train": _pick(args.train_per_class, protocol.train_per_class),
                     "val": _pick(args.val_per_class, protocol.val_per_class)}
        shards, seconds = make_shards(args.src, out / "shards", workers=os.cpu_count() or 1, per_class=per_class)
        stages.append(f"sharding {seconds:.1f} s")
    else:
        shards = args.shards
        if not (shards / "manifest.json").is_file():
            raise ProxyError(f"--shards {shards}: no manifest.json; make them with python -m preprocess.shard")

    rows, curves, results = [], [], []
    for epochs in epochs_list:
        variants = [("recipe", [])] + [(f"no {a}", ablation_overrides(a, res)) for a in ablations if a != "ema"]
        for seed, (label, ablation) in itertools.product(args.seeds, variants):
            name = run_name(epochs, label, seed)
            run_dir = out / "runs" / name
            seed_flag = [f"--run.seed={seed}"] if seed else []  # seed 0 is the preset's own
            argv_run = train_argv(shards, run_dir, epochs=epochs, res=res, device=device, threads=threads,
                                  extra=[*protocol.overrides, *ablation, *seed_flag, *overrides])
            metrics = finished_metrics(run_dir, epochs)
            if metrics is not None:
                changed = changed_settings(run_dir, argv_run)
                if changed:
                    raise ProxyError(f"{run_dir} is a finished run with other settings ({'; '.join(changed)}): "
                                     f"use another --out, or delete that folder to train it again")
                wall, resumed = sum(m["seconds"] for m in metrics), "earlier"
                print(f"benchmarks.proxy: {label}, {epochs} epochs, seed {seed}: {run_dir} already finished, "
                      f"reported as it is (delete the folder to train it again)", flush=True)
            else:
                resumed = (run_dir / "checkpoints" / "last.pt").is_file()
                print(f"benchmarks.proxy: {label}, {epochs} epochs, seed {seed}: "
                      f"python -m train.main {shlex.join(argv_run)}", flush=True)
                code, wall = run_command(["-m", "train.main", *argv_run])
                if code != 0:
                    hint = ("it rejected the command line or data (its error is above)" if code == 2 else
                            "re-run the same command to resume it")
                    print(f"benchmarks.proxy: error: train.main exited with {code} for {run_dir}; {hint}",
                          file=sys.stderr)
                    return code
                run_command(["-m", "viz.plots", str(run_dir), "--output", str(out / f"curves-{name}.png")])
                metrics = read_metrics(run_dir)
            rows.append(summarize(metrics, name=f"{name} ({label})", res=res, wall_seconds=wall, resumed=resumed))
            curves.append(f"{name}: {curve(metrics)}")
            results.append({"run": name, "variant": label, "seed": seed, "epochs": epochs, "res": res,
                            "wall_seconds": wall, "resumed": resumed, "metrics": metrics})
            if label == "recipe" and "ema" in ablations:
                rows.append(summarize(metrics, name=f"{name} (no ema: raw weights)", res=res, wall_seconds=wall,
                                      resumed=resumed, raw_weights=True))
                curves.append(f"{name} raw weights: {curve(metrics, 'top1_raw')}")

    load_after = os.getloadavg()[0]
    (out / "proxy.json").write_text(json.dumps({"device": device, "shards": str(Path(shards).resolve()),
                                                "results": results}, indent=1))
    _print_table(rows)
    notes = (f"Data: {describe_shards(shards)}; preset {PRESET}; device {device}"
             f"{'; ' + '; '.join(stages) if stages else ''}. Per-epoch top-1 % ({'; '.join(curves)}). "
             f"fastai leaderboard (xresnet50, 128 px, un-squashed images): "
             f"{', '.join(f'{v}% at {k} epochs' for k, v in LEADERBOARD_128.items())}. "
             f"1-min load average {load_before:.2f} at start, {load_after:.2f} at end.")
    if len(args.seeds) > 1:
        from benchmarks.report import markdown_table

        notes += ("\n\nTop-1 over seeds " + " ".join(map(str, args.seeds)) + " (final epoch; EMA weights except "
                  "the raw-weights row):\n\n" + markdown_table(seed_summary(results)))
    print(notes)
    target = report_path(args.report, args.no_report)
    if target is not None:
        command = "python -m benchmarks.proxy " + shlex.join(argv if argv is not None else sys.argv[1:])
        append_result("Real photos (Imagenette proxy)", rows, command=command, device=_device_name(device),
                      notes=notes, path=target, commit=commit)
        print(f"appended to {target}")
    return 0


def _device_name(device: str) -> str:
    from benchmarks.report import cpu_description

    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} (1 GPU), host {cpu_description()}"
    return cpu_description()


def _print_table(rows: list[dict]) -> None:
    from benchmarks.report import markdown_table

    print(markdown_table(rows))


if __name__ == "__main__":
    sys.exit(main())
