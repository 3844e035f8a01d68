"""The real trainer (a subprocess, CPU) logs the LR that train.schedule gives for the global step at every
step, across a SIGTERM that stops it mid-epoch; the resumed run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.test_checkpoint import assert_same_weights, start, wait_for_line
from tests.test_train import metrics, run, train_cmd
from train import checkpoint, schedule

# Two epochs (32 px, then 64 px) of 12 steps of 16 images; warm-up for half an epoch, so steps 0-5 warm up and
# 6-23 decay; every step logged to TensorBoard (TINY's sync_every=1); a checkpoint every 4 steps.
STEPS_PER_EPOCH, EPOCHS, WARMUP, PEAK = 12, 2, 0.5, 0.8 * 16 / 256  # TINY pins lr_per_256=0.8
LOGGED = ["--schedule.epochs=2", "--schedule.warmup_epochs=0.5", "--checkpoint.every_steps=4",
          "--run.deterministic=true", "--run.tensorboard=true"]


def lr_at(step: int) -> float:
    return schedule.lr_at(step, steps_per_epoch=STEPS_PER_EPOCH, peak=PEAK, warmup_epochs=WARMUP, epochs=EPOCHS)


def logged_lr(run_dir: Path) -> dict[int, float]:
    """TensorBoard's train/lr: {steps done: LR of the step just taken}, orphaned events of a stopped session
    purged as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = events.Scalars("train/lr")
    steps = [e.step for e in scalars]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {e.step: e.value for e in scalars}


def assert_lr_is_the_schedule(run_dir: Path) -> None:
    lrs = logged_lr(run_dir)
    # After s steps the logged LR is the one step s - 1 (0-based global step) used: lr_at(s - 1).
    assert sorted(lrs) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    want = {s: lr_at(s - 1) for s in lrs}
    assert lrs == pytest.approx(want, rel=1e-6)  # float32 in the event file
    assert max(lrs, key=lrs.get) == 7  # the peak: 0-based step 6 = half an epoch, logged after 7 steps
    for record in metrics(run_dir):  # metrics.jsonl: the LR of the epoch's last step
        assert record["lr"] == pytest.approx(lr_at(record["step"] - 1), rel=1e-12), record
    assert [r["step"] for r in metrics(run_dir)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


@pytest.fixture(scope="module")
def uninterrupted(shards_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lr-logged") / "run"
    proc = run(train_cmd(shards_dir, out, *LOGGED))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_logged_lr_is_the_schedule_at_the_global_step(uninterrupted):
    assert lr_at(5) < PEAK and lr_at(6) == pytest.approx(PEAK)
    assert_lr_is_the_schedule(uninterrupted)


@pytest.fixture(scope="module")
def stopped(shards_dir, tmp_path_factory, uninterrupted) -> tuple[Path, dict]:
    """The same run stopped by SIGTERM as soon as its first epoch starts, then resumed: (run folder, last.pt
    as the stop left it)."""
    out = tmp_path_factory.mktemp("sigterm") / "run"
    proc = start(train_cmd(shards_dir, out, *LOGGED))
    try:
        wait_for_line(proc, "epoch 1/2: res")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 75, rest
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert f"(epoch 1, step {state['step']})" in rest and "stopped by SIGTERM" in rest
    assert not (out / "metrics.jsonl").read_text()  # no epoch finished
    fresh = torch.load(uninterrupted / "model_final.pth", weights_only=True)
    assert any(not torch.equal(state["model"][k], fresh[k]) for k in fresh)  # it had trained, not finished
    resumed = run(train_cmd(shards_dir, out, *LOGGED))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'last.pt'} (epoch 1, step {state['step']})" in resumed.stdout
    return out, state


def test_sigterm_stops_mid_epoch_and_the_resumed_run_matches(stopped, uninterrupted):
    out, state = stopped
    # Where it stopped: inside the first epoch, after at least one step, so "same weights" is not trivial.
    assert state["epoch"] == 0 and 0 < state["step"] < STEPS_PER_EPOCH, (state["epoch"], state["step"])
    assert state["global_step"] == state["step"]
    assert_same_weights(uninterrupted, out)
    lrs = logged_lr(out)
    assert set(range(state["step"] + 1, EPOCHS * STEPS_PER_EPOCH + 1)) <= set(lrs)  # the resumed session: all
    assert lrs == pytest.approx({s: lr_at(s - 1) for s in lrs}, rel=1e-6)  # each at its global step


def test_the_resumed_run_keeps_every_logged_step(stopped):
    out, state = stopped
    assert sorted(logged_lr(out)) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
