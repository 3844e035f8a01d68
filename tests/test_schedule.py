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


# ----------------------------------------------------------------------------- the recipe, value by value
# FFCV's rn50 schedule at peak 1.7 (4096 images), 100 steps per epoch, 2 warm-up epochs from 1e-4 x peak:
# warm-up lr = 1.7 x (1e-4 + 0.9999 x t / 2); decay lr = 1.7 x (E - t) / (E - 2); t = step / 100 (epochs).
# Written out by hand so that a quadratic warm-up, a cosine decay, a plateau at the peak or an end above 0
# each fails at least one row.
RECIPE_LR = [
    # (epochs, step, lr)
    (16, 0, 0.00017),  # 1.7 x 1e-4
    (16, 50, 0.4251275),  # 1.7 x (1e-4 + 0.9999 x 0.25); quadratic would give ~0.106
    (16, 100, 0.850085),  # 1.7 x (1e-4 + 0.9999 x 0.5)
    (16, 150, 1.2750425),  # 1.7 x (1e-4 + 0.9999 x 0.75)
    (16, 200, 1.7),  # the peak, at exactly 2 epochs
    (16, 201, 1.6987857142857143),  # 1.7 x 13.99 / 14: the step after the peak already decays (no plateau)
    (16, 550, 1.275),  # 1.7 x 10.5 / 14; cosine would give ~1.451
    (16, 900, 0.85),  # 1.7 x 7 / 14: half-way through the decay
    (16, 1250, 0.425),  # 1.7 x 3.5 / 14; cosine would give ~0.249
    (16, 1599, 0.0012142857142857142),  # 1.7 x 0.01 / 14: the last step
    (16, 1600, 0.0),  # the end of the last epoch
    (16, 2000, 0.0),  # past the end (a run continued past its schedule)
    (24, 700, 1.3136363636363637),  # 1.7 x 17 / 22; cosine ~1.492
    (24, 1300, 0.85),  # 1.7 x 11 / 22
    (24, 2399, 0.0007727272727272727),  # 1.7 x 0.01 / 22
    (88, 2400, 1.2651162790697674),  # 1.7 x 64 / 86
    (88, 4500, 0.85),  # 1.7 x 43 / 86
    (88, 8799, 0.00019767441860465116),  # 1.7 x 0.01 / 86
    (88, 8800, 0.0),
]


@pytest.mark.parametrize("epochs, step, expected", RECIPE_LR)
def test_lr_at_chosen_steps_of_the_recipe(epochs, step, expected):
    got = lr_at(step, steps_per_epoch=100, peak=1.7, warmup_epochs=2, epochs=epochs, start_factor=1e-4)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_lr_is_exactly_linear_between_the_corners():
    """Equal steps change the LR by equal amounts: +peak x (1 - 1e-4) / 200 per step while warming up,
    -peak / 1400 per step while decaying (16 epochs of 100 steps)."""
    lr = lambda s: lr_at(s, steps_per_epoch=100, peak=1.7, warmup_epochs=2, epochs=16)  # noqa: E731
    rises = [lr(s + 1) - lr(s) for s in range(200)]
    falls = [lr(s + 1) - lr(s) for s in range(200, 1600)]
    assert rises == pytest.approx([1.7 * 0.9999 / 200] * 200, rel=1e-9)
    assert falls == pytest.approx([-1.7 / 1400] * 1400, rel=1e-9)


def test_lr_without_warmup_starts_at_the_peak_and_fractional_warmup_ends_mid_epoch():
    lr = lambda s, w: lr_at(s, steps_per_epoch=313, peak=0.4, warmup_epochs=w, epochs=10)  # noqa: E731
    assert lr(0, 0) == 0.4 and lr(313, 0) == pytest.approx(0.4 * 9 / 10)  # start_factor unused
    assert lr(0, 0.5) == pytest.approx(0.4e-4)
    assert lr(156, 0.5) == pytest.approx(0.4 * (1e-4 + 0.9999 * 156 / 156.5))  # still warming up
    assert lr(157, 0.5) == pytest.approx(0.4 * (10 - 157 / 313) / 9.5)  # t = 0.5016: decaying


def test_rn50_preset_is_ffcvs_recipe():
    """The numbers the $100 run depends on; changing one must be a deliberate edit of this test."""
    from train.config import resolve

    cfg = resolve("rn50")
    assert (cfg.optim.lr_per_256, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.label_smoothing) == (
        0.10625, 0.9, 1e-4, 0.1)
    assert (cfg.schedule.warmup_epochs, cfg.schedule.warmup_start_factor, cfg.schedule.res_min,
            cfg.schedule.res_max, cfg.schedule.res_ramp_start, cfg.schedule.res_ramp_end) == (2, 1e-4, 160, 192,
                                                                                          0.75, 0.875)
    assert (cfg.model.arch, cfg.model.blurpool, cfg.val.res, cfg.val.crop_ratio, cfg.val.flip_tta) == (
        "resnet50", True, 256, 0.875, True)
    assert peak_lr(cfg.optim.lr_per_256, 8 * cfg.data.batch_size, cfg.optim.lr) == pytest.approx(1.7)


def test_absolute_peak_below_one_still_wins():
    assert peak_lr(0.1, 1024, 0.5) == 0.5 and peak_lr(0.1, 1024, 1e-3) == 1e-3 and peak_lr(0.1, 1024) == 0.4


def test_resolution_end_points_are_exact_even_off_the_multiple():
    """res_min through the ramp's start epoch and res_max from its end epoch, as given (not rounded to 32)."""
    res = [res_at(e, epochs=16, res_min=100, res_max=200, ramp_start=0.75, ramp_end=0.875) for e in range(16)]
    assert res[:12] == [100] * 12 and res[12] == 160 and res[13:] == [200] * 3  # ramp epochs 11 and 13


def test_short_runs_ramp_from_epoch_0():
    assert res_ramp_epochs(1, 0.75, 0.875) == (0, 0) and res_ramp_epochs(4, 0.1, 0.2) == (0, 0)
    assert res_ramp_epochs(8, 0.1, 0.3) == (0, 1)
    assert [res_at(e, epochs=4, res_min=128, res_max=192, ramp_start=0.1, ramp_end=0.2) for e in range(4)] == [
        128, 192, 192, 192]  # a ramp that starts and ends at epoch 0: epoch 0 is still res_min
