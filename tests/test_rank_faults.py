"""A dead or hung rank under torchrun (2 gloo processes on the CPU): SIGKILL of one worker with
--max-restarts restarts both, which resume from the last checkpoint and end with the weights of a run
that was never killed; a rank stopped with SIGSTOP makes the other one stop after --run.dist_timeout_s with
one line that names the collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_checkpoint import assert_same_weights
from tests.test_train import ROOT, TINY, run
from train import checkpoint

RESUMABLE = ["--schedule.epochs=2", "--checkpoint.every_steps=2", "--run.deterministic=true", "--run.threads=1"]


def torchrun_cmd(data: Path, out: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "-m", "train.main", "--data", str(data), "--out", str(out), *TINY,
            *RESUMABLE, *extra]


def worker_pid(torchrun_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the worker process with RANK=rank among the torchrun agent's children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {torchrun_pid}")


def wait_for_checkpoint(last: Path, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last.is_file():
            try:
                return checkpoint.load(last)
            except Exception:  # caught between the rename and the directory fsync: read it again
                pass
        time.sleep(0.2)
    raise AssertionError(f"{last} did not appear")


@pytest.fixture(scope="module")
def two_rank_reference(shards_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-rank-reference")
    proc = run(torchrun_cmd(shards_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_killed(shards_dir, tmp_path, two_rank_reference):
    out = tmp_path / "run"
    # more than one restart allowed: on a loaded machine a restarted round's gloo rendezvous can itself fail
    # (connection refused to a peer still starting) and take one more restart; the run must still end the same
    proc = start(torchrun_cmd(shards_dir, out, restarts=3))
    try:
        state = wait_for_checkpoint(out / "checkpoints" / "last.pt")
        victim = worker_pid(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, stderr[-3000:]
    assert state["epoch"] < 2  # killed before the end
    assert "resuming from" in stdout  # the restarted workers resumed instead of starting over
    assert_same_weights(two_rank_reference, out)


def test_a_hung_rank_times_out_with_one_line(shards_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(torchrun_cmd(shards_dir, out, "--run.dist_timeout_s=10"))
    victim = None
    try:
        wait_for_checkpoint(out / "checkpoints" / "last.pt")
        victim = worker_pid(proc.pid, rank=1)
        os.kill(victim, signal.SIGSTOP)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if victim is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(victim, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("train.main: error: rank 0")]
    assert errors, stderr[-3000:]
    assert "failed waiting for another rank" in errors[0] and "--run.dist_timeout_s=10" in errors[0]
    assert "last checkpoint: " in errors[0]


def test_each_torchrun_round_gets_its_own_store_keys(monkeypatch):
    """torchrun shares one store with the workers of every restart round: a round's keys must not be read by
    the next one (the cause of restarted rounds that connected to a dead rank's port)."""
    import datetime

    import torch.distributed as dist

    from train import distributed

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for restart, value in (("0", b"dead rank's port"), ("1", b"new port")):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        distributed.round_store(datetime.timedelta(seconds=10)).set("rank1/address", value)
    assert server.get("train.main/round-0/rank1/address") == b"dead rank's port"
    assert server.get("train.main/round-1/rank1/address") == b"new port"
    assert not server.check(["rank1/address"])  # nothing unprefixed, where every round would meet
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # a store per round (or no torchrun): torch's own
    assert distributed.round_store() is None
