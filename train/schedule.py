"""Learning-rate and resolution schedules: pure functions of the step / epoch (FFCV's ResNet-50 recipe).

LR: piecewise linear in fractional epochs, interpolated per iteration: warmup_start_factor x peak at
step 0, the peak at `warmup_epochs`, 0 at the end of the last epoch ("triangular"/"cyclic" in FFCV).
Resolution: res_min until the ramp starts, res_max after it ends, linear in between rounded to a
multiple of `multiple` pixels. The ramp epochs come from fractions of the epoch count, which
reproduces FFCV's published rn50 configs for 16/24/32/40/56/88 epochs exactly, e.g. 88 epochs:
start_ramp 65, end_ramp 76; 16 epochs: 11 and 13.
"""

from __future__ import annotations


def peak_lr(lr_per_256: float, global_batch: int, absolute: float = 0.0) -> float:
    """Linear scaling rule: the LR is given per 256 images of global batch, unless an absolute
    peak (> 0, for the whole global batch) is given, which wins."""
    return absolute if absolute > 0 else lr_per_256 * global_batch / 256


def lr_at(step: int, *, steps_per_epoch: int, peak: float, warmup_epochs: float, epochs: int,
          start_factor: float = 1e-4) -> float:
    """LR for optimizer step `step` (0-based, counted from the start of training)."""
    t = step / steps_per_epoch  # fractional epoch
    if t < warmup_epochs:
        return peak * (start_factor + (1 - start_factor) * t / warmup_epochs)
    if t >= epochs:
        return 0.0
    return peak * (epochs - t) / (epochs - warmup_epochs)


def res_ramp_epochs(epochs: int, ramp_start: float, ramp_end: float) -> tuple[int, int]:
    """0-based epochs (last at res_min, first at res_max) from fractions of the epoch count."""
    return max(round(ramp_start * epochs) - 1, 0), max(round(ramp_end * epochs) - 1, 0)


def res_at(epoch: int, *, epochs: int, res_min: int, res_max: int, ramp_start: float, ramp_end: float,
           multiple: int = 32) -> int:
    """Training resolution in pixels for 0-based `epoch`."""
    start, end = res_ramp_epochs(epochs, ramp_start, ramp_end)
    if epoch <= start:
        return res_min
    if epoch >= end:
        return res_max
    res = res_min + (res_max - res_min) * (epoch - start) / (end - start)
    return int(round(res / multiple)) * multiple
