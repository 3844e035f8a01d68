"""Train a ResNet-50 on WebDataset shards: `python -m train.main` or `torchrun --nproc_per_node=N -m train.main`.

    python -m train.main --data SHARDS --out RUN_DIR [--config rn50|smoke|file.yaml] [--section.key=value ...]

Outputs in RUN_DIR: config.yaml (the resolved config), metrics.jsonl (one line per epoch), tensorboard/,
checkpoints/last.pt (every epoch end, every checkpoint.every_minutes / every_steps, and on Ctrl-C/SIGTERM/
SIGUSR1), checkpoints/best.pt (best top-1), checkpoints/epoch-NNN.pt (the last checkpoint.keep epoch ends), run.json
(the run's state) and, at the end, model.safetensors + config.json (the weights with how they were built and
evaluated) and model_final.pth (the same weights as a plain state_dict: with BlurPool, a plain torchvision
ResNet loads it but computes another network; `train.model.load_model(RUN_DIR)` builds the right one).
Re-running the same command on the same RUN_DIR resumes from checkpoints/last.pt; a finished run, or one
whose settings differ from its checkpoint's, is refused unless --run.resume=force (train/lifecycle.py).
RUN_DIR/run.json says what state the run is in (running, stopped, finished, failed) and why.

Exit status: 0 finished; 2 bad command line, config, data folder, run folder, or not enough memory for the
preset (one line on stderr); 3 the loss became NaN/inf (the message names the step and the last good
checkpoint); 4 a checkpoint could not be written (disk full): the previous one is intact; 5 another rank
stopped answering (dead or hung past --run.dist_timeout_s): resume from the last checkpoint;
75 (EX_TEMPFAIL, "resume me") stopped by Ctrl-C, SIGTERM or SIGUSR1 after saving last.pt: run the same
command again; 130 a second Ctrl-C quit without saving. Under torchrun, torchrun itself reports any
non-zero worker status as a failure. docs/RELIABILITY.md lists every fault and what it leaves behind.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from preprocess.cli import close_flag
from preprocess.manifest import DatasetError, class_sorted_problem, load_manifest, split_shards
from train import artifact, checkpoint, config, distributed, engine, lifecycle, preflight, schedule, trackers
from train.config import Config, ConfigError
from train.model import ModelEma, build_model, build_optimizer, init_weights, plain_state_dict

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_SAVE_FAILED, EXIT_COLLECTIVE, EXIT_RESUME = 0, 2, 3, 4, 5, 75
EXIT_INTERRUPTED = checkpoint.EXIT_INTERRUPTED


class NonFiniteLoss(RuntimeError):
    pass


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the message names it and the intact previous one."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise ConfigError(message)


# The flags timm's and the torchvision references' users type, as the config keys they mean.
ALIASES = {"--epochs": "schedule.epochs", "--batch-size": "data.batch_size", "--lr": "optim.lr",
           "--workers": "data.num_threads", "-j": "data.num_threads", "--seed": "run.seed", "--device": "run.device"}
# Flags of those scripts that mean something else here: one line that says what to type instead.
NOT_HERE = {
    "--resume": "train.main resumes by itself: re-run the same command (same --out); to start a new run from "
                "weights use --model.init=PATH",
    "--amp": "mixed precision is already on where it helps (--run.precision=auto: bf16, or fp16 + GradScaler, on "
             "GPUs; fp32 on the CPU); --run.precision=bf16|fp16|fp32 picks one",
    "--pretrained": "use --model.init=torchvision (from the torch cache) or --model.init=PATH",
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The fixed flags, plus `section.key=value` strings from every `--section.key[=]value` (and the ALIASES)."""
    aliases = "\n".join(f"  {flag:<13} --{key}" for flag, key in ALIASES.items())
    parser = _Parser(prog="python -m train.main", allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description=__doc__.split("\n\n", 2)[1].strip(),
                     epilog=f"short flags (--lr is the peak for the whole global batch, as FFCV and timm state it):\n"
                            f"{aliases}\n\nconfig keys (default shown; a preset overrides some):\n" + config.describe())
    parser.add_argument("--data", required=True, type=Path, help="shard folder written by `python -m preprocess.shard`")
    parser.add_argument("--out", "--output", dest="out", required=True, type=Path,
                        help="run folder (created; an existing one is resumed)")
    parser.add_argument("--config", default="rn50", help=f"preset ({', '.join(config.presets())}) or a YAML file")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        token = rest[i]
        flag = token.split("=", 1)[0]
        if flag in NOT_HERE:
            raise ConfigError(f"{flag}: {NOT_HERE[flag]}")
        if flag in ALIASES:
            token = f"--{ALIASES[flag]}" + token[len(flag):]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            meant = close_flag(token, [*ALIASES, "--data", "--out", "--output", "--config"])
            hint = f"did you mean {meant}? " if meant else ""
            raise ConfigError(f"unrecognized argument {token!r} ({hint}config overrides look like "
                              f"--optim.lr_per_256=0.2; --help lists them)")
        if "=" in token:
            overrides.append(token[2:])
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{token[2:]}={rest[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"{token}: missing value (write {token}=VALUE)")
        i += 1
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_args(argv)
        cfg = config.resolve(args.config, overrides)
        trackers.check_available(cfg.run.tracker)
        lifecycle.check_out_dir(args.out)
        device_type = distributed.pick_device(cfg.run.device)
        amp_dtype = engine.pick_precision(cfg.run.precision, device_type)
        manifest = check_data(args.data, cfg.data.allow_unshuffled)
    except (ConfigError, DatasetError, ValueError) as exc:
        if distributed.env_rank() == 0:
            print(f"train.main: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save
        print("train.main: interrupted before training started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    run = Training(cfg, args.data, args.out, manifest, device_type, amp_dtype)
    return run.execute()


def check_data(data_dir: Path, allow_unshuffled: bool) -> dict:
    """The shard folder's manifest, once its files are all there (sizes as listed) and its train split is
    shuffled and has two classes or more (class-sorted shards are refused: they waste a run); raises
    DatasetError saying what to do."""
    manifest = load_manifest(data_dir)
    split_shards(data_dir, "train", manifest)
    split_shards(data_dir, "val", manifest)
    present = [c for c in manifest["splits"]["train"].get("per_class", []) if c]
    classes = len(present) if "per_class" in manifest["splits"]["train"] else int(manifest["num_classes"])
    if classes < 2:
        raise DatasetError(f"{Path(data_dir) / 'manifest.json'}: the train split holds images of {classes} class(es); "
                           f"a classifier needs at least 2 (check --src / the class folders of preprocess.shard)")
    problem = class_sorted_problem(data_dir, manifest, "train")
    if problem and not allow_unshuffled:
        raise DatasetError(f"{problem}; re-shard it with `python -m preprocess.shard` (it shuffles the train "
                           f"split), or pass --data.allow_unshuffled=true to train anyway")
    if problem and distributed.env_rank() == 0:
        print(f"train.main: warning: {problem}; training anyway (--data.allow_unshuffled=true)", file=sys.stderr)
    return manifest


def data_fingerprint(manifest: dict) -> str:
    """A short digest of the shards a run trains and validates on (names, sizes and checksums)."""
    shards = {split: [(s["name"], s["bytes"], s.get("sha256")) for s in manifest["splits"][split]["shards"]]
              for split in ("train", "val")}
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]


class Training:
    """The wiring of one run: processes, model, optimizer, loaders, checkpoints and the epoch loop."""

    def __init__(self, cfg: Config, data_dir: Path, run_dir: Path, manifest: dict, device_type: str,
                 amp_dtype: torch.dtype | None):
        self.cfg, self.data_dir, self.run_dir = cfg, Path(data_dir), Path(run_dir)
        self.manifest, self.num_classes = manifest, int(manifest["num_classes"])
        self.device_type, self.amp_dtype = device_type, amp_dtype
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.lock = lifecycle.RunLock(self.run_dir)
        self.writer = checkpoint.BackgroundWriter()  # rank 0's checkpoint writes with checkpoint.async_save
        self.began = time.monotonic()
        self.started = False  # whether this process got as far as recording the run as running
        self.tracker = None  # MLflow / W&B (run.tracker), rank 0

    def execute(self) -> int:
        timeout = datetime.timedelta(seconds=self.cfg.run.dist_timeout_s)
        self.dist = distributed.init_distributed(self.device_type, timeout=timeout)
        try:
            with checkpoint.StopSignals() as self.signals:
                self.setup()
                status = self.fit()
            if status == EXIT_OK:
                self.record_state("finished", epochs=self.cfg.schedule.epochs, best_top1=self.best_top1)
            return status
        except (ConfigError, DatasetError) as exc:
            return self.fail(EXIT_USAGE, str(exc))
        except NonFiniteLoss as exc:
            return self.fail(EXIT_DIVERGED, str(exc))
        except SaveFailed as exc:
            return self.fail(EXIT_SAVE_FAILED, str(exc))
        except RuntimeError as exc:
            lost = exc if isinstance(exc, distributed.CollectiveError) else distributed.lost_peer(exc)
            if lost is None:
                raise
            where = f"epoch {getattr(self, 'epoch', 0) + 1}, step {getattr(self, 'step', 0)}"
            return self.fail(EXIT_COLLECTIVE, f"rank {self.dist.rank}, {where}: {lost}; a rank is dead or hung "
                                              f"(limit: --run.dist_timeout_s={self.cfg.run.dist_timeout_s:g}); last "
                                              f"checkpoint: {getattr(self, 'last_saved', 'none yet')}; run the same "
                                              f"command to resume from it (torchrun --max-restarts=N does so by "
                                              f"itself)", every_rank=True)
        finally:
            if self.tracker is not None:
                self.tracker.close("failed")  # after finish() or stop() this does nothing
            self.writer.wait()  # a background checkpoint write in progress ends before the process does
            if getattr(self, "train_loader", None) is not None:
                self.train_loader.close()  # a pipeline built ahead for an epoch that will not run
            self.lock.release()
            distributed.shutdown()

    def fail(self, status: int, message: str, every_rank: bool = False) -> int:
        if self.dist.is_main or every_rank:  # a lost peer: whichever rank noticed says so
            print(f"train.main: error: {message}", file=sys.stderr)
        if self.dist.is_main:
            self.log_line(f"error: {message}")
            if self.started:
                self.record_state("failed", exit=status, reason=message)
        return status

    def record_state(self, state: str, **facts) -> None:
        if self.dist.is_main:
            lifecycle.write_state(self.run_dir, state, epoch=getattr(self, "epoch", 0), step=getattr(self, "step", 0),
                                  command=" ".join(["python -m train.main", *sys.argv[1:]]), **facts)

    # -- set-up ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        plan = self.open_run()
        configure_runtime(cfg.run, dist.local_world_size)
        self.device = dist.device
        self.check_before_building(plan)
        self.global_batch = cfg.data.batch_size * dist.world_size * cfg.optim.accum_steps
        self.peak_lr = schedule.peak_lr(cfg.optim.lr_per_256, self.global_batch, cfg.optim.lr)
        memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model, self.num_classes).to(self.device, memory_format=memory_format)
        if cfg.model.init and plan.checkpoint is None:  # a resumed run has all its state: init only seeds a start
            try:
                self.say("model.init: " + init_weights(self.model, cfg.model.init, cfg.model.arch,
                                                       self.manifest.get("classes")))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        self.ema = ModelEma(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        loader_device = {"device": "gpu" if self.device_type == "cuda" else "cpu",
                         "device_id": dist.local_rank if self.device_type == "cuda" else None,
                         "num_threads": cfg.data.num_threads, "dtype": self.amp_dtype or torch.float32,
                         "rank": dist.rank, "world_size": dist.world_size,
                         "prefetch_depth": cfg.data.prefetch_depth, "hw_decoder_load": cfg.data.hw_decoder_load}
        from train import data  # DALI is imported here, not when this module is imported

        try:
            self.train_loader = data.TrainLoader(self.data_dir, cfg.data.batch_size, seed=cfg.run.seed,
                                                 min_area=cfg.data.min_area, decode=cfg.data.decode,
                                                 **loader_device)
            self.val_loader = data.ValLoader(self.data_dir, cfg.val.batch_size, res=cfg.val.res,
                                             crop_ratio=cfg.val.crop_ratio, **loader_device)
        except ValueError as exc:  # e.g. a batch larger than a rank's share of the images
            raise ConfigError(str(exc)) from exc
        self.steps_per_epoch = len(self.train_loader) // cfg.optim.accum_steps  # optimizer steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--optim.accum_steps={cfg.optim.accum_steps}: more than the {len(self.train_loader)} "
                              f"batches per epoch of each process; lower it or --data.batch_size")
        self.meter = engine.TrainMeter(self.device)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best_top1, self.history = -1.0, []
        self.last_saved, self.saved_at = "none yet", None
        if plan.checkpoint is not None:
            self.resume(plan.checkpoint)
        if plan.state == "finished" and dist.is_main:
            archived = lifecycle.archive_finished(self.run_dir, self.epoch)
            self.say(f"--run.resume=force: continuing a finished run from epoch {self.epoch} to "
                     f"{cfg.schedule.epochs}; its final files are kept in {archived}")
        self.train_model = self.model
        if dist.world_size > 1:
            self.train_model = distributed.wrap_ddp(self.model, self.device_type, dist.local_rank)
        if cfg.model.compile:
            # One static graph per resolution (160, 192): a dynamic-shape graph would serve them all, slower.
            self.train_model = torch.compile(self.train_model, dynamic=False)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_txt = self.run_dir / "log.txt"  # the console's lines, without progress-bar redraws
            self.log_line(f"$ python -m train.main {' '.join(sys.argv[1:])}")
            header = (f"resolved config of this run; global batch {self.global_batch} on {dist.world_size} "
                      f"process(es), peak lr {self.peak_lr:g}\ndata: {self.data_dir.resolve()}")
            checkpoint.write_text_atomic(self.run_dir / "config.yaml", config.dump_yaml(cfg, header))
            self.log = engine.MetricsLog(self.run_dir, self.history, tensorboard=cfg.run.tensorboard,
                                         first_step=self.global_step)
            self.tracker = trackers.open_tracker(cfg.run.tracker, self.run_dir, config.to_dict(cfg), self.history,
                                                 self.say)
        self.record_state("running")
        self.started = True
        self.last_save_time = time.monotonic()

    def open_run(self) -> lifecycle.Plan:
        """Collective: rank 0 locks RUN_DIR and decides (new, resume, refuse); every rank follows."""
        self.fingerprint = data_fingerprint(self.manifest)
        error, plan = None, None
        if self.dist.is_main:
            try:
                self.lock.acquire()
                plan = lifecycle.plan(self.run_dir, self.cfg, self.fingerprint)
            except ConfigError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error:
            raise ConfigError(error)
        if plan is None:  # the other ranks read the same folder: the same answer, and the checkpoint to resume
            plan = lifecycle.plan(self.run_dir, self.cfg, self.fingerprint)
        for note in plan.notes:
            self.say(note)
        return plan

    def check_before_building(self, plan: lifecycle.Plan) -> None:
        """Pre-flight: memory for this preset on this device, disk for the run folder, and the shards against
        their manifest."""
        cfg, dist = self.cfg, self.dist
        if cfg.run.memory_check:
            estimate = preflight.estimate_memory(cfg, self.num_classes, amp_dtype=self.amp_dtype,
                                                 max_side=preflight.max_image_side(self.manifest),
                                                 sample_bytes=preflight.bytes_per_sample(self.manifest))
            available = preflight.available_memory(self.device, dist.local_world_size)
            problem = preflight.memory_problem(estimate, available, cfg, self.device.type)
            if problem:
                raise ConfigError(problem)
        problem = None
        if dist.is_main:  # rank 0 writes the run folder
            problem = preflight.disk_problem(self.run_dir, preflight.run_disk_need(cfg, self.num_classes))
        problem = distributed.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
        if cfg.data.verify == "sha256":
            start = time.perf_counter()
            verified = preflight.read_verified(self.data_dir)
            mine = preflight.verify_checksums(self.data_dir, self.manifest, dist.local_rank, dist.local_world_size,
                                              verified)
            results = distributed.all_gather_object(mine)
            bad = [line for lines, _good in results for line in lines]
            checked = {tar: seen for _bad, good in results for tar, seen in good.items()}
            if dist.local_rank == 0 and checked != {k: v for k, v in verified.items() if k in checked}:
                preflight.write_verified(self.data_dir, {**verified, **checked})
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise DatasetError(f"{bad[0]}{more}; re-run `python -m preprocess.shard` with the same arguments: "
                                   f"it redoes just the damaged shards")
            read = len(checked) - sum(1 for k, v in checked.items() if verified.get(k) == v)
            self.say(f"data: every shard matches its SHA-256 in the manifest ({read} read, "
                     f"{len(checked) - read} remembered from {preflight.VERIFIED_FILE}; "
                     f"{time.perf_counter() - start:.1f} s)")

    def resume(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # another architecture or class count
            raise ConfigError(f"{self.last_path}: does not fit this model ({str(exc).splitlines()[-1].strip()}); "
                              "use a new --out folder") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a resumed run: start it from the loaded weights
                self.ema = ModelEma(self.model, self.cfg.ema.decay)
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        if self.global_step != self.epoch * self.steps_per_epoch + self.step:
            # Another global batch (--run.resume=force with a new batch size, or another process count): the
            # steps of the old epochs do not map onto this one's; the epoch in progress restarts, and the
            # schedule continues from this run's own step count.
            if self.step:
                self.say(f"warning: {self.last_path} was written with {state['world_size']} process(es) and "
                         f"another number of steps per epoch: epoch {self.epoch + 1} restarts from its first step")
            self.step = 0
            self.global_step = self.epoch * self.steps_per_epoch
        elif state["world_size"] == self.dist.world_size:
            mine = state["ranks"][self.dist.rank]
            try:
                self.train_loader.load_state_dict(mine["data"])
            except ValueError as exc:
                raise ConfigError(f"{self.last_path}: {exc}") from exc
            checkpoint.restore_rng(mine["rng"], self.device)
            self.meter.load_state_dict(mine["meter"])
        elif self.step > 0:
            self.say(f"warning: {self.last_path} was written by {state['world_size']} processes, this run has "
                     f"{self.dist.world_size}: epoch {self.epoch + 1} restarts from its first step")
            self.step = 0
            self.global_step = self.epoch * self.steps_per_epoch
        self.last_saved = f"{self.last_path} (epoch {self.epoch + 1}, step {self.step})"
        self.saved_at = (self.epoch, self.step)
        self.say(f"resuming from {self.last_saved}")

    # -- the loop --------------------------------------------------------------------------------------

    def fit(self) -> int:
        cfg = self.cfg.schedule
        for epoch in range(self.epoch, cfg.epochs):
            if self.stop_requested():
                return self.stop()
            self.epoch = epoch
            res = self.res_at(epoch)
            if self.train_epoch(epoch, res):
                return self.stop()
            self.finish_epoch(epoch, res)
        return self.finish()

    def res_at(self, epoch: int) -> int:
        s = self.cfg.schedule
        return schedule.res_at(epoch, epochs=s.epochs, res_min=s.res_min, res_max=s.res_max,
                               ramp_start=s.res_ramp_start, ramp_end=s.res_ramp_end, multiple=s.res_multiple)

    def train_epoch(self, epoch: int, res: int) -> bool:
        """One epoch (or its remainder after a resume); True if a stop signal ended it early."""
        self.say(f"epoch {epoch + 1}/{self.cfg.schedule.epochs}: res {res} px, {self.steps_per_epoch} steps of "
                 f"{self.global_batch} images" + (f", resuming at step {self.step}" if self.step else ""))
        batches = self.train_loader.epoch(epoch, res)
        self.pipeline_wait = self.train_loader.wait_seconds  # ~0 when it was built during validation
        self.say(f"epoch {epoch + 1}: input pipeline ready in {self.pipeline_wait:.2f} s"
                 + (", built during the previous validation" if self.train_loader.built_ahead else ""))
        self.bar = None
        if self.dist.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps_per_epoch, initial=self.step, desc=f"epoch {epoch + 1}", unit="step",
                            dynamic_ncols=True, leave=False, file=sys.stderr,
                            mininterval=0.5 if sys.stderr.isatty() else 30)  # logs: a line per 30 s
        self.res = res
        self.session_start = (self.meter.steps, self.meter.seconds)
        first_step = self.step
        try:
            return engine.train_one_epoch(
                self.train_model, batches, self.optimizer, criterion=self.criterion, scaler=self.scaler,
                amp_dtype=self.amp_dtype, device=self.device, lr_at_step=self.lr_at,
                first_global_step=self.global_step, meter=self.meter, ema=self.ema,
                accum_steps=self.cfg.optim.accum_steps,
                after_step=lambda k: self.after_step(first_step + k))
        finally:
            if self.bar is not None:
                self.bar.close()

    def after_step(self, step: int) -> bool:
        """Runs after every optimizer step (`step` = steps done in this epoch); True stops the epoch."""
        self.step, self.global_step = step, self.global_step + 1
        if self.bar is not None:
            self.bar.update(1)
        ck, world = self.cfg.checkpoint, self.dist.world_size
        stop_wanted = self.signals.received is not None
        time_due = ck.every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * ck.every_minutes
        step_due = ck.every_steps > 0 and self.global_step % ck.every_steps == 0
        sync = step % self.cfg.run.sync_every == 0 or step == self.steps_per_epoch or step_due
        if world == 1:
            sync = sync or stop_wanted or time_due  # no other rank to agree with: act at once
        if not sync:
            return False
        local = torch.stack([self.meter.loss_sum, self.meter.first_bad.double()]).tolist()
        big = float(2**52)  # all-reduce MAX of (big - first bad step) picks the earliest bad step of any rank
        flags = torch.tensor([stop_wanted, time_due and self.dist.is_main, big - local[1] if local[1] >= 0 else 0],
                             dtype=torch.float64, device=self.device)
        stop, time_due, bad = distributed.all_reduce_(flags, op="max").tolist()
        if bad:
            self.diverged(int(big - bad), local[0])
        self.progress(local[0])
        if self.dist.is_main and self.meter.steps:
            self.log.scalar("train/loss_running", local[0] / self.meter.steps, self.global_step)
            self.log.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
        if stop:
            return True  # stop() saves
        if (time_due or step_due) and step < self.steps_per_epoch:  # the epoch end saves anyway
            self.save(self.last_path)
        return False

    def lr_at(self, global_step: int) -> float:
        s = self.cfg.schedule
        return schedule.lr_at(global_step, steps_per_epoch=self.steps_per_epoch, peak=self.peak_lr,
                              warmup_epochs=s.warmup_epochs, epochs=s.epochs, start_factor=s.warmup_start_factor)

    def diverged(self, bad_step: int, loss_sum: float):
        epoch, step = divmod(bad_step, self.steps_per_epoch)
        raise NonFiniteLoss(
            f"non-finite loss ({loss_sum}) at optimizer step {bad_step} (epoch {epoch + 1}, step {step + 1}/"
            f"{self.steps_per_epoch}, lr {self.lr_at(bad_step):.4g}); "
            f"last good checkpoint: {self.last_saved}; hint: lower --optim.lr_per_256 or raise "
            f"--schedule.warmup_epochs, try --run.precision=fp32 to rule out overflow, then re-run the same "
            f"command to resume from that checkpoint")

    def progress(self, loss_sum: float) -> None:
        if self.bar is None or self.meter.steps == 0:
            return
        steps0, seconds0 = self.session_start
        done_here = self.meter.steps - steps0
        rate = done_here / max(self.meter.seconds - seconds0, 1e-9) if done_here else 0.0  # steps/s, this session
        remaining = self.cfg.schedule.epochs * self.steps_per_epoch - self.global_step
        self.bar.set_postfix_str(
            f"loss {loss_sum / self.meter.steps:.3f}, {rate * self.global_batch:.0f} img/s, "
            f"lr {self.optimizer.param_groups[0]['lr']:.3g}, res {self.res}, "
            f"run ETA {format_seconds(remaining / rate) if rate else '?'}", refresh=False)

    def finish_epoch(self, epoch: int, res: int) -> None:
        totals = torch.tensor([self.meter.loss_sum.item(), self.meter.steps, self.meter.images,
                               self.meter.steady_images], dtype=torch.float64, device=self.device)
        loss_sum, steps, images, steady_images = distributed.all_reduce_(totals).tolist()
        train_seconds = self.meter.seconds
        # images/s of all ranks over this rank's time, first step of each session (compile, warm-up) left out
        if steady_images and self.meter.steady_seconds > 0:
            rate = steady_images / self.meter.steady_seconds
        else:
            rate = images / max(train_seconds, 1e-9)
        record = {"epoch": epoch + 1, "step": self.global_step, "train_loss": loss_sum / max(steps, 1)}
        last = epoch + 1 == self.cfg.schedule.epochs
        if not last:  # build the next epoch's pipeline while validation runs
            self.train_loader.prepare(epoch + 1, self.res_at(epoch + 1))
        if last or (epoch + 1) % self.cfg.val.every_epochs == 0:
            start = time.perf_counter()
            record.update(self.validate())
            record["eval_seconds"] = round(time.perf_counter() - start, 3)
        record.update({"lr": self.optimizer.param_groups[0]["lr"], "resolution": res,
                       "images_per_s": round(rate, 1), "seconds": round(train_seconds, 3),
                       "pipeline_wait_s": round(getattr(self, "pipeline_wait", 0.0), 3),
                       "decode": self.train_loader.decode_used or self.cfg.data.decode})
        self.history.append(record)
        improved = record.get("top1", -1.0) > self.best_top1
        if improved:
            self.best_top1 = record["top1"]
        self.epoch, self.step = epoch + 1, 0
        self.meter = engine.TrainMeter(self.device)
        def links(keep=self.cfg.checkpoint.keep, last=self.last_path, best=self.best_path):
            lifecycle.keep_epoch_checkpoint(last, epoch + 1, keep)
            if improved:
                checkpoint.link_atomic(last, best)  # a hard link: no copy of the file

        self.save(self.last_path, then=links)
        if self.dist.is_main:
            self.log.append(record, self.global_step)
            if self.tracker is not None:
                self.tracker.log_epoch(record)
            top5 = f"{100 * record['top5']:.2f}%" if "top5" in record else "n/a (5 classes or fewer)"
            top = (f"top-1 {100 * record['top1']:.2f}%, top-5 {top5} "
                   f"({record['val_images']} images), ") if "top1" in record else ""
            self.say(f"epoch {epoch + 1}/{self.cfg.schedule.epochs}: train loss {record['train_loss']:.4f}, {top}"
                     f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f} s")

    def validate(self) -> dict:
        flip = self.cfg.val.flip_tta
        distributed.broadcast_buffers_(self.model)
        if self.ema is not None:
            distributed.broadcast_buffers_(self.ema.module)
        evaluated = self.ema.module if self.ema is not None else self.model
        result = engine.evaluate(evaluated, self.val_loader, device=self.device, amp_dtype=self.amp_dtype,
                                 flip_tta=flip)
        record = {"top1": result["top1"], "val_images": result["images"]}
        if self.num_classes > 5:  # with 5 classes or fewer every label is in the top 5
            record["top5"] = result["top5"]
        if self.ema is not None:
            raw = engine.evaluate(self.model, self.val_loader, device=self.device, amp_dtype=self.amp_dtype,
                                  flip_tta=flip)
            record["top1_raw"] = raw["top1"]
        return record

    def finish(self) -> int:
        self.flush_saves()  # best.pt and the epoch links are in place before the final files are written
        if self.dist.is_main:
            final = self.ema.module if self.ema is not None else self.model
            path = self.run_dir / "model_final.pth"
            checkpoint.save_atomic(plain_state_dict(final), path)
            last = self.history[-1] if self.history and "top1" in self.history[-1] else None  # of `final`
            try:
                artifact.write_model_files(self.run_dir, final, self.cfg, classes=self.manifest.get("classes"),
                                           metrics=last, weights="ema" if self.ema is not None else "model")
            except OSError as exc:
                raise SaveFailed(f"could not write {self.run_dir / artifact.MODEL_FILE} ({exc.strerror or exc}); "
                                 f"{path} is complete") from exc
            self.log.close()
            evaluated = [r for r in self.history if "top1" in r]
            if evaluated:
                r = evaluated[-1]
                top5 = f"{100 * r['top5']:.2f}%" if "top5" in r else "n/a"
                self.say(f"final top-1: {100 * r['top1']:.2f}% (top-5 {top5}, "
                         f"{r['val_images']} val images, epoch {r['epoch']}); weights: {path}")
            self.say(self.end_of_run(evaluated))
            if self.tracker is not None:
                self.tracker.finish(self.history, self.final_files())
        distributed.barrier()
        return EXIT_OK

    def end_of_run(self, evaluated: list[dict]) -> str:
        """What the run took and left, and what to run next."""
        train = sum(r.get("seconds", 0.0) for r in self.history)
        val = sum(r.get("eval_seconds", 0.0) for r in self.history)
        lines = [f"run finished: {len(self.history)} epochs, training {format_seconds(train)} + validation "
                 f"{format_seconds(val)} (all sessions; this one {format_seconds(time.monotonic() - self.began)})"]
        if evaluated:
            best = max(evaluated, key=lambda r: r["top1"])
            lines.append(f"top-1: best {100 * best['top1']:.2f}% (epoch {best['epoch']}), last "
                         f"{100 * evaluated[-1]['top1']:.2f}% (epoch {evaluated[-1]['epoch']})")
        lines.append("files: " + ", ".join(str(f) for f in self.final_files()))
        lines.append(f"next: python -m viz.report {self.run_dir} --data {self.data_dir}")
        return "\n".join(lines)

    def final_files(self) -> list[Path]:
        names = (artifact.MODEL_FILE, "config.json", "model_final.pth", "checkpoints/best.pt", "metrics.jsonl",
                 "summary.csv", "log.txt")
        return [self.run_dir / name for name in names if (self.run_dir / name).exists()]

    def stop_requested(self) -> bool:
        """Collective: did any rank get SIGTERM/SIGUSR1?"""
        flag = torch.tensor([self.signals.received is not None], dtype=torch.float64, device=self.device)
        return bool(distributed.all_reduce_(flag, op="max").item())

    def stop(self) -> int:
        if self.saved_at != (self.epoch, self.step):  # e.g. a signal during validation: last.pt is current
            self.save(self.last_path)
        self.flush_saves()
        by = self.signals.name or "a signal to another rank"
        self.say(f"stopped by {by}: {self.last_saved}; run the same command to resume (exit {EXIT_RESUME})")
        self.record_state("stopped", reason=f"stopped by {by}")
        if self.dist.is_main:
            self.log.close()
            if self.tracker is not None:
                self.tracker.close("stopped")
        return EXIT_RESUME

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self, path: Path, then=None) -> None:
        """Collective: every rank contributes its loader position and RNG; rank 0 writes the file, then runs
        `then` (what needs the file in place: epoch links, best.pt). With checkpoint.async_save, rank 0 takes a
        host copy of the state and writes it in a background thread while training goes on; a failed write
        stops the run at the next save, or at the end (`flush_saves`)."""
        mine = {"data": self.train_loader.state_dict(), "rng": checkpoint.capture_rng(self.device),
                "meter": self.meter.state_dict()}
        ranks = distributed.all_gather_object(mine)
        where = f"{path} (epoch {self.epoch + 1}, step {self.step})"
        background = self.cfg.checkpoint.async_save
        error = None
        if self.dist.is_main:
            state = {
                "format": checkpoint.CHECKPOINT_FORMAT, "epoch": self.epoch, "step": self.step,
                "global_step": self.global_step, "world_size": self.dist.world_size,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "ranks": ranks, "best_top1": self.best_top1, "history": self.history,
                "config": config.to_dict(self.cfg), "data_fingerprint": self.fingerprint,
                "classes": self.manifest.get("classes"),  # so a copied best.pt names its classes
            }
            if background:
                error = self.writer.wait()  # the previous write first: one host copy of the state at a time
                if error is None:
                    snapshot = checkpoint.host_copy(state)
                    self.writer.submit(lambda: self._write(snapshot, path, where, then))
            else:
                error = self._write(state, path, where, then)
        error = distributed.broadcast_object(error)  # also: nobody exits before the file is in place
        if error:
            raise SaveFailed(error)
        if not self.dist.is_main:
            self.last_saved = where
        self.saved_at = (self.epoch, self.step)
        self.last_save_time = time.monotonic()
        self.say(f"checkpoint: {where}" + (" (being written in the background)" if background else ""))

    def _write(self, state: dict, path: Path, where: str, then) -> str | None:
        """Rank 0: write one checkpoint; an error message, or None."""
        try:
            checkpoint.save_atomic(state, path)
        except OSError as exc:  # disk full, quota, RLIMIT_FSIZE: save_atomic left the previous file as it was
            return (f"could not write {path} ({exc.strerror or exc}); the previous checkpoint is intact: "
                    f"{self.last_saved}; free space on {path.parent} and run the same command to resume")
        self.last_saved = where
        if then is not None:
            then()
        return None

    def flush_saves(self) -> None:
        """Collective: wait for rank 0's background write (checkpoint.async_save) and stop on its error."""
        if not self.cfg.checkpoint.async_save:
            return
        error = distributed.broadcast_object(self.writer.wait() if self.dist.is_main else None)
        if error:
            raise SaveFailed(error)

    def say(self, message: str) -> None:
        """A line for the console and, once the run folder exists, RUN_DIR/log.txt (rank 0)."""
        if self.dist.is_main:
            if getattr(self, "bar", None) is not None:
                self.bar.write(message, file=sys.stdout)
            else:
                print(message, flush=True)
            sys.stdout.flush()
            self.log_line(message)

    def log_line(self, message: str) -> None:
        if getattr(self, "log_txt", None) is not None:
            with open(self.log_txt, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def configure_runtime(run: config.RunConfig, local_processes: int) -> None:
    """Seeds, CPU threads and determinism switches; called once per process before the model exists."""
    torch.manual_seed(run.seed)
    np.random.seed(run.seed)
    random.seed(run.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(run.threads or max(1, cores // local_processes))
    torch.backends.cudnn.benchmark = not run.deterministic
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast: TF32 is enough
    torch.backends.cudnn.allow_tf32 = True
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


if __name__ == "__main__":
    sys.exit(main())
