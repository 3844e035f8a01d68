"""Checkpoints: atomic and weights_only-loadable; SIGKILL after a mid-epoch checkpoint, SIGTERM and Ctrl-C
(exit 75) all resume to exactly the weights of an uninterrupted run (CPU, deterministic); a checkpoint write
that fails (file size limit) exits 4 with the previous checkpoint intact."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_train import ROOT, metrics, run, train_cmd
from train import checkpoint

# Two epochs (32 px, then 64 px) of 12 steps, a checkpoint every 4 steps, deterministic kernels.
RESUMABLE = ["--schedule.epochs=2", "--checkpoint.every_steps=4", "--run.deterministic=true"]


@pytest.fixture(scope="module")
def reference(shards_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def wait_for_line(proc: subprocess.Popen, fragment: str) -> str:
    for line in proc.stdout:
        if fragment in line:
            return line
    raise AssertionError(f"the run ended (exit {proc.wait()}) before printing {fragment!r}")


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a = torch.load(run_a / "model_final.pth", weights_only=True)
    b = torch.load(run_b / "model_final.pth", weights_only=True)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def kill_after_first_checkpoint(shards_dir: Path, out: Path, args: tuple[str, ...] = tuple(RESUMABLE)) -> None:
    proc = start(train_cmd(shards_dir, out, *args))
    try:
        wait_for_line(proc, "checkpoint: ")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_then_resume_is_bit_identical(shards_dir, tmp_path, reference):
    out = tmp_path / "run"
    kill_after_first_checkpoint(shards_dir, out)
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["step"] > 0  # killed after a mid-epoch checkpoint of the first epoch
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'last.pt'} (epoch 1, step {state['step']})" in resumed.stdout
    assert_same_weights(reference, out)
    assert metrics(out) == [{**r, **{k: m[k] for k in ("images_per_s", "seconds", "eval_seconds", "pipeline_wait_s")
                                     if k in r}}
                            for r, m in zip(metrics(reference), metrics(out))]  # same losses and accuracies


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_sigterm_saves_and_exits_75_then_resumes(signum, shards_dir, tmp_path, reference):
    """SIGTERM (spot reclaim, `sky jobs cancel`) and SIGUSR1 (deploy/aws/spot_watcher.py's spot notice) on the
    real trainer: a mid-epoch save and exit 75. The SIGUSR1 run stops there; its resume is SIGTERM's."""
    out = tmp_path / "run"
    proc = start(train_cmd(shards_dir, out, *RESUMABLE))
    try:
        wait_for_line(proc, "epoch 1/2: res")
        proc.send_signal(signum)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, rest
    assert f"stopped by {signal.Signals(signum).name}" in rest
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step"] < 12  # stopped inside the first epoch: not a trivial resume
    assert {"model", "optimizer", "scaler", "ema", "ranks", "config", "epoch", "step"} <= set(state)
    assert state["config"]["checkpoint"]["every_steps"] == 4
    assert json.loads((out / "run.json").read_text())["state"] == "stopped"
    if signum != signal.SIGTERM:
        return
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(reference, out)


def test_ctrl_c_saves_exits_75_without_a_traceback_then_resumes(shards_dir, tmp_path, reference):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(train_cmd(shards_dir, out, *RESUMABLE), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        wait_for_line(proc, "epoch 1/2: res")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground group on Ctrl-C
        rest, errors = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, errors[-3000:]
    assert "stopped by SIGINT" in rest and "run the same command to resume" in rest
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and 0 < state["step"] < 12  # the epoch in progress was saved, not lost
    assert json.loads((out / "run.json").read_text())["state"] == "stopped"
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(epoch 1, step {state['step']})" in resumed.stdout
    assert_same_weights(reference, out)


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(shards_dir, tmp_path, background):
    out = tmp_path / "run"
    kill_after_first_checkpoint(shards_dir, out)
    last = out / "checkpoints" / "last.pt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 20 MB: logs and config fit, a ResNet-18 checkpoint (~90 MB) does not: as a full disk would. In the
    # background (checkpoint.async_save) the failed write is reported at the next save, the same way.
    extra = ["--checkpoint.async_save=true"] if background else []
    failed = subprocess.run(train_cmd(shards_dir, out, *RESUMABLE, *extra), cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=600, preexec_fn=_file_size_limit(20_000_000))
    assert failed.returncode == 4, failed.stderr[-3000:]
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith(f"train.main: error: could not write {last}") and "previous checkpoint is intact" in message
    assert "Traceback" not in failed.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before  # still the checkpoint from before
    assert not [p.name for p in last.parent.iterdir() if ".tmp" in p.name]
    assert json.loads((out / "run.json").read_text())["state"] == "failed"
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))  # space again: it resumes from that checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_background_saves_write_the_state_of_their_step_while_training_goes_on(shards_dir, tmp_path, reference):
    """checkpoint.async_save: epoch 1's file is written while epoch 2 trains, from a host copy of the state,
    so it holds exactly what the synchronous run saved at that step; the run ends with the same weights."""
    out = tmp_path / "run"
    proc = run(train_cmd(shards_dir, out, *RESUMABLE, "--checkpoint.async_save=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(being written in the background)" in proc.stdout
    assert_same_weights(reference, out)
    for name in ("epoch-001.pt", "epoch-002.pt", "best.pt"):
        ours, theirs = (checkpoint.load(run_dir / "checkpoints" / name) for run_dir in (out, reference))
        assert (ours["epoch"], ours["step"], ours["global_step"]) == (theirs["epoch"], theirs["step"],
                                                                     theirs["global_step"])
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"]), name
        momentum = [(a["momentum_buffer"], b["momentum_buffer"])
                    for a, b in zip(ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values())]
        assert momentum and all(torch.equal(a, b) for a, b in momentum), name
    assert (out / "checkpoints" / "best.pt").stat().st_ino == (out / "checkpoints" / "epoch-002.pt").stat().st_ino


def test_background_writer_runs_one_write_at_a_time_and_hands_back_its_error():
    writer = checkpoint.BackgroundWriter()
    order = []
    assert writer.submit(lambda: order.append("first") or None) is None
    assert writer.submit(lambda: order.append("second") or "disk full") is None  # waits for the first
    assert order == ["first"] or order == ["first", "second"]
    assert writer.submit(lambda: order.append("third")) == "disk full"  # the second's error; not started
    assert order == ["first", "second"] and writer.wait() is None
    assert writer.submit(lambda: 1 / 0) is None and writer.wait().startswith("ZeroDivisionError")
    state = {"w": torch.ones(3), "nested": [{"m": torch.zeros(2)}], "n": 7}
    copy = checkpoint.host_copy(state)
    state["w"].add_(1)
    state["nested"][0]["m"].add_(1)
    assert torch.equal(copy["w"], torch.ones(3)) and torch.equal(copy["nested"][0]["m"], torch.zeros(2))
    assert copy["n"] == 7


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with checkpoint.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1 and signals.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    device = torch.device("cpu")
    state = checkpoint.capture_rng(device)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.save_atomic({"rng": state}, tmp_path / "rng.pt")
    checkpoint.restore_rng(checkpoint.load(tmp_path / "rng.pt")["rng"], device)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_accumulated_steps_resume_bit_identically(shards_dir, tmp_path):
    """--optim.accum_steps=2: the global batch doubles (so does the peak LR), an epoch has half the optimizer
    steps, and a SIGKILL after a mid-epoch checkpoint resumes to the weights of an uninterrupted run."""
    accum = [*RESUMABLE, "--optim.accum_steps=2", "--schedule.epochs=1"]
    whole = tmp_path / "whole"
    proc = run(train_cmd(shards_dir, whole, *accum))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 steps of 32 images" in proc.stdout  # 12 batches of 16 per epoch -> 6 optimizer steps of 2 x 16
    assert metrics(whole)[-1]["step"] == 6
    out = tmp_path / "run"
    kill_after_first_checkpoint(shards_dir, out, tuple(accum))
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["step"] == 4 and state["ranks"][0]["data"]["step"] == 8  # batches, not steps
    resumed = run(train_cmd(shards_dir, out, *accum))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(whole, out)
