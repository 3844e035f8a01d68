"""Checkpoints: atomic and weights_only-loadable; SIGKILL after a mid-epoch checkpoint and SIGTERM
(exit 75) both resume to exactly the weights of an uninterrupted run (CPU, deterministic)."""

from __future__ import annotations

import os
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


def test_sigkill_mid_epoch_then_resume_is_bit_identical(shards_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(train_cmd(shards_dir, out, *RESUMABLE))
    try:
        wait_for_line(proc, "checkpoint: ")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["step"] > 0  # killed after a mid-epoch checkpoint of the first epoch
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'last.pt'} (epoch 1, step {state['step']})" in resumed.stdout
    assert_same_weights(reference, out)
    assert metrics(out) == [{**r, **{k: m[k] for k in ("images_per_s", "seconds", "eval_seconds", "pipeline_wait_s")
                                     if k in r}}
                            for r, m in zip(metrics(reference), metrics(out))]  # same losses and accuracies


def test_sigterm_saves_and_exits_75_then_resumes(shards_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(train_cmd(shards_dir, out, *RESUMABLE))
    try:
        wait_for_line(proc, "epoch 1/2: res")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, rest
    assert "stopped by SIGTERM" in rest
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "ema", "ranks", "config", "epoch", "step"} <= set(state)
    assert state["config"]["checkpoint"]["every_steps"] == 4
    resumed = run(train_cmd(shards_dir, out, *RESUMABLE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(reference, out)


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
