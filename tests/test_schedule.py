"""train.schedule: the LR and resolution schedules hit their end points and match FFCV's configs."""

from __future__ import annotations

import pytest

from train.schedule import lr_at, peak_lr, res_at, res_ramp_epochs


def test_peak_lr_scales_with_global_batch():
    assert peak_lr(0.10625, 4096) == pytest.approx(1.7)
    assert peak_lr(0.10625, 512) == pytest.approx(1.7 / 8)


def test_absolute_peak_lr_wins_over_the_per_256_rate():
    from train.config import resolve

    cfg = resolve("rn50", ["optim.lr=1.7"])
    assert peak_lr(cfg.optim.lr_per_256, 1024, cfg.optim.lr) == 1.7
    assert peak_lr(cfg.optim.lr_per_256, 1024, resolve("rn50").optim.lr) == pytest.approx(0.425)


@pytest.mark.parametrize("warmup", [0.0, 2.0, 0.5])
def test_lr_end_points(warmup):
    spe, epochs, peak = 100, 16, 1.7
    lr = lambda step: lr_at(step, steps_per_epoch=spe, peak=peak, warmup_epochs=warmup, epochs=epochs)  # noqa: E731
    assert lr(0) == pytest.approx(peak * (1e-4 if warmup else 1))
    assert lr(int(warmup * spe)) == pytest.approx(peak)
    assert lr(epochs * spe) == 0.0
    assert 0 < lr(epochs * spe - 1) < peak / (epochs - warmup) / spe * 1.01  # last step: one step above 0
    values = [lr(s) for s in range(epochs * spe + 1)]
    top = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:top], values[1:top + 1]))  # rises, then falls
    assert all(a >= b for a, b in zip(values[top:], values[top + 1:]))


# (epochs, start_ramp, end_ramp) of libffcv/ffcv-imagenet rn50_configs/rn50_{E}_epochs.yaml
FFCV_RAMPS = [(16, 11, 13), (24, 17, 20), (32, 23, 27), (40, 29, 34), (56, 41, 48), (88, 65, 76)]


@pytest.mark.parametrize("epochs, start, end", FFCV_RAMPS)
def test_resolution_ramp_matches_ffcv(epochs, start, end):
    assert res_ramp_epochs(epochs, 0.75, 0.875) == (start, end)
    res = [res_at(e, epochs=epochs, res_min=160, res_max=192, ramp_start=0.75, ramp_end=0.875) for e in range(epochs)]
    assert res[0] == 160 and res[start] == 160 and res[end] == 192 and res[-1] == 192
    assert all(r % 32 == 0 for r in res) and res == sorted(res)


def test_resolution_steps_through_multiples():
    res = [res_at(e, epochs=40, res_min=128, res_max=256, ramp_start=0.5, ramp_end=0.9) for e in range(40)]
    assert set(res) == {128, 160, 192, 224, 256}
