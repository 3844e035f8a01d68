"""One training step, one training epoch, one evaluation: plain functions over a model and batches.

Nothing here reads the whole config or knows about processes beyond `distributed.all_reduce_`;
`train.main` wires these to the loaders, the schedule and the checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from train import distributed


def pick_precision(preference: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). auto: bf16 on GPUs that have it, else fp16; fp32 on CPU."""
    if preference == "fp32" or (preference == "auto" and device_type == "cpu"):
        return None
    if preference == "fp16":
        if device_type == "cpu":
            raise ValueError("run.precision=fp16 needs a GPU (use fp32 or bf16 on the CPU)")
        return torch.float16
    if preference == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               criterion: nn.Module, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Forward, backward, optimizer step; returns the (detached) loss without a device sync."""
    return accumulated_step(model, [(images, labels)], optimizer, criterion, scaler, amp_dtype)


def accumulated_step(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     optimizer: torch.optim.Optimizer, criterion: nn.Module, scaler: torch.amp.GradScaler,
                     amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimizer step over the gradients of several micro-batches: each loss is divided by their count, so
    the step is the one their concatenation would give (up to BatchNorm, which sees each micro-batch alone).
    Under DDP the gradients are all-reduced once, after the last backward. Returns the mean loss, detached."""
    optimizer.zero_grad(set_to_none=True)
    total = None
    for i, (images, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(images.device.type, amp_dtype):
                loss = criterion(model(images), labels)
                if len(micro_batches) > 1:
                    loss = loss / len(micro_batches)
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total


class TrainMeter:
    """Running loss of an epoch on the device (read only at sync points) plus host-side counts.

    `first_bad` is the first global step whose loss was not finite, -1 while all were. `steady_images` and
    `steady_seconds` leave out the first step of each `train_one_epoch` call (its first batch, torch.compile
    of a new resolution, cuDNN autotuning): they give the images/s that is logged.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps = 0
        self.images = 0
        self.seconds = 0.0  # training time, checkpoint writes excluded
        self.steady_images = 0
        self.steady_seconds = 0.0  # training time after the first step of each session

    def add(self, loss: torch.Tensor, global_step: int, images: int) -> None:
        self.loss_sum += loss.double()
        self.first_bad.masked_fill_(~torch.isfinite(loss) & (self.first_bad < 0), global_step)
        self.steps += 1
        self.images += images

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum.item()), "first_bad": int(self.first_bad.item()),
                "steps": self.steps, "images": self.images, "seconds": self.seconds,
                "steady_images": self.steady_images, "steady_seconds": self.steady_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.first_bad.fill_(state["first_bad"])
        self.steps, self.images, self.seconds = int(state["steps"]), int(state["images"]), float(state["seconds"])
        self.steady_images = int(state.get("steady_images", 0))
        self.steady_seconds = float(state.get("steady_seconds", 0.0))

    def images_per_second(self) -> float:
        """Steady-state rate; the plain average when no step after the first was timed."""
        if self.steady_images and self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
                    criterion: nn.Module, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
                    device: torch.device, lr_at_step: Callable[[int], float], first_global_step: int,
                    meter: TrainMeter, ema=None, after_step: Callable[[int], bool] | None = None,
                    accum_steps: int = 1) -> bool:
    """Train on `batches`; step k (0-based, counted here) uses lr_at_step(first_global_step + k) and the
    gradients of `accum_steps` consecutive batches (a last group of fewer is left out).

    `after_step(steps_done_here)` runs after every optimizer step; when it returns True the epoch
    stops early and this returns True. The caller bounds `batches` to the steps still to do.
    """
    model.train()
    start = time.perf_counter()
    batches = iter(batches)
    for k in itertools.count():
        group = list(itertools.islice(batches, accum_steps))
        if len(group) < accum_steps or not group:
            break
        group = [(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                 for images, labels in group]
        global_step = first_global_step + k
        set_lr(optimizer, lr_at_step(global_step))
        loss = accumulated_step(model, group, optimizer, criterion, scaler, amp_dtype)
        if ema is not None:
            ema.update()
        images = sum(images.shape[0] for images, _ in group)
        meter.add(loss, global_step, images)
        if k == 0 and device.type == "cuda":
            torch.cuda.synchronize(device)  # once per epoch: the warm-up step's time stays out of the steady rate
        now = time.perf_counter()
        meter.seconds += now - start
        if k > 0:
            meter.steady_seconds += now - start
            meter.steady_images += images
        if after_step is not None:
            stop = after_step(k + 1)
            now = time.perf_counter()  # checkpoint writes in after_step are not training time
            if stop:
                return True
        start = now
    return False


def eval_logits(model: nn.Module, images: torch.Tensor, *, amp_dtype: torch.dtype | None,
                flip_tta: bool) -> torch.Tensor:
    """fp32 logits of a batch as validation scores it; with flip_tta the sum of the image's and its
    mirror's (same ranking as their mean). viz calls this too, so its predictions are the trainer's."""
    with autocast(images.device.type, amp_dtype):
        logits = model(images).float()
        if flip_tta:
            logits = logits + model(torch.flip(images, dims=[3])).float()
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, device: torch.device, amp_dtype: torch.dtype | None,
             flip_tta: bool) -> dict:
    """Top-1/top-5 over all ranks' batches: correct counts and image counts are summed, so under DDP
    (each rank seeing a disjoint share) every validation image counts exactly once."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 correct, top-5 correct, images
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = eval_logits(model, images, amp_dtype=amp_dtype, flip_tta=flip_tta)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += labels.numel()  # a Python int: no host-device sync per batch
    distributed.all_reduce_(totals)
    correct1, correct5, count = totals.tolist()
    return {"top1": correct1 / max(count, 1), "top5": correct5 / max(count, 1), "images": count}


SUMMARY_COLUMNS = {  # summary.csv column: metrics.jsonl key (timm's names where timm has the column)
    "epoch": "epoch", "train_loss": "train_loss", "eval_top1": "top1", "eval_top5": "top5", "lr": "lr",
    "resolution": "resolution", "images_per_s": "images_per_s", "train_seconds": "seconds",
    "eval_seconds": "eval_seconds"}


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per epoch), RUN_DIR/summary.csv (the same as a table: top-1/top-5 in
    percent, blank on epochs without validation) and, when available, TensorBoard scalars.

    On resume the file is rewritten from the checkpoint's history, so an epoch that finished after
    the last checkpoint is not listed twice; TensorBoard events past `first_step` are purged.
    """

    def __init__(self, run_dir: Path, history: list[dict], *, tensorboard: bool, first_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, self.path)
        self.records = list(history)
        self.write_summary()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                # events after the checkpoint's step go (they are redone); those of that step were logged before it
                # was saved and stay
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=first_step + 1)

    def write_summary(self) -> None:
        rows = [",".join(SUMMARY_COLUMNS)]
        for record in self.records:
            cells = []
            for column, key in SUMMARY_COLUMNS.items():
                value = record.get(key)
                if value is not None and key in ("top1", "top5"):
                    value = round(100 * value, 4)
                cells.append("" if value is None else str(value))
            rows.append(",".join(cells))
        tmp = self.path.with_name(".summary.csv.tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, self.path.with_name("summary.csv"))

    def append(self, record: dict, global_step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        self.write_summary()
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, global_step)
            self.writer.flush()

    def scalar(self, tag: str, value: float, global_step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
