"""train.checkpoint's small promises, each in milliseconds: atomic writes and copies (a failed write names the
bytes written and the free space, leaves no temp file), hard-linked epoch files, loading refuses pickled code,
every RNG (numpy's cached Gaussian included) round-trips, and Ctrl-C twice quits with 130.
(Written to kill the mutants that `make mutation MUTATE=checkpoint` found alive; docs/TESTING.md.)"""

from __future__ import annotations

import datetime
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_save_atomic_makes_missing_folders_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "last.pt"
    checkpoint.save_atomic({"w": torch.arange(3)}, path)
    assert torch.equal(checkpoint.load(path)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_write_is_an_oserror_with_bytes_and_free_space(tmp_path, monkeypatch):
    first_line = "PytorchStreamWriter failed writing file data/0: " + "x" * 100  # 148 characters

    def failing_save(obj, f):
        f.write(b"x" * 1234)
        raise RuntimeError(first_line + "\nsecond line of the trace")

    def disk_usage(folder):
        assert Path(folder) == tmp_path  # the checkpoint's own disk
        return type("Usage", (), {"free": 3 * 2**30 + 2**29})()  # 3.5 GiB

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
    with pytest.raises(OSError) as caught:
        checkpoint.save_atomic({"w": 1}, tmp_path / "last.pt")
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == f"write failed after 1234 bytes, 3.50 GiB free on the disk ({first_line[:120]})"
    assert isinstance(caught.value.__cause__, RuntimeError) and list(tmp_path.iterdir()) == []


def test_copy_write_and_link_atomic(tmp_path):
    src = tmp_path / "last.pt"
    src.write_bytes(b"epoch 3")
    checkpoint.copy_atomic(src, tmp_path / "best.pt")
    checkpoint.write_text_atomic(tmp_path / "state.json", '{"state": "running"}')
    checkpoint.link_atomic(src, tmp_path / "epoch-003.pt")
    assert (tmp_path / "best.pt").read_bytes() == b"epoch 3"
    assert (tmp_path / "best.pt").stat().st_ino != src.stat().st_ino  # a copy
    assert (tmp_path / "state.json").read_text() == '{"state": "running"}'
    assert (tmp_path / "epoch-003.pt").stat().st_ino == src.stat().st_ino  # a second name, no copy
    (tmp_path / f".epoch-004.pt.tmp{os.getpid()}").write_bytes(b"left by a crash")
    checkpoint.link_atomic(src, tmp_path / "epoch-004.pt")  # a stale temp name is no obstacle
    assert (tmp_path / "epoch-004.pt").stat().st_ino == src.stat().st_ino
    checkpoint.write_text_atomic(tmp_path / "state.json", "finished")
    assert (tmp_path / "state.json").read_text() == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-003.pt", "epoch-004.pt", "last.pt",
                                                           "state.json"]


def test_link_atomic_copies_where_hard_links_fail(tmp_path, monkeypatch):
    src = tmp_path / "last.pt"
    src.write_bytes(b"bytes")

    def no_links(a, b):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    checkpoint.link_atomic(src, tmp_path / "epoch-001.pt")
    assert (tmp_path / "epoch-001.pt").read_bytes() == b"bytes"
    assert (tmp_path / "epoch-001.pt").stat().st_ino != src.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.pt", "last.pt"]


def test_load_refuses_pickled_objects(tmp_path):
    torch.save({"when": datetime.datetime(2026, 1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="[Ww]eights.only"):
        checkpoint.load(tmp_path / "pickled.pt")


def test_a_gpu_runs_rng_state_resumes_on_the_cpu():
    """A checkpoint written on a GPU carries a "cuda" RNG state; a CPU resume must not touch CUDA with it."""
    state = checkpoint.capture_rng(torch.device("cpu"))
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    expected = torch.rand(3)
    checkpoint.restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_every_rng_round_trips_with_cached_gaussians(tmp_path):
    np.random.seed(1)
    random.seed(2)
    np.random.randn()  # numpy's legacy generator now holds a cached second Gaussian (has_gauss = 1)
    random.gauss(0, 1)  # and Python's too
    state = checkpoint.capture_rng(torch.device("cpu"))
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["keys"].dtype == torch.int64
    assert set(state) == {"torch", "numpy", "python"}  # no CUDA state on a CPU run
    checkpoint.save_atomic({"rng": state}, tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.randn(3), random.gauss(0, 1), random.random())
    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng(checkpoint.load(tmp_path / "rng.pt")["rng"], torch.device("cpu"))
    again = (torch.rand(2), np.random.randn(3), random.gauss(0, 1), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


CTRL_C = """
import os, signal, sys, time
from train import checkpoint
with checkpoint.StopSignals() as s:
    os.kill(os.getpid(), signal.SIGINT)
    print(s.received == signal.SIGINT, s.name, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    print(s.received == signal.SIGTERM, s.name, flush=True)
    s.received = signal.SIGINT
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not reached", flush=True)
"""


def test_ctrl_c_asks_to_save_and_twice_quits_with_130():
    proc = subprocess.run([sys.executable, "-c", CTRL_C], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == checkpoint.EXIT_INTERRUPTED == 130, proc.stderr
    assert proc.stdout.splitlines() == ["True SIGINT", "True SIGTERM"]
    assert proc.stderr == ("\ntrain.main: Ctrl-C: saving at the next step, then exiting (Ctrl-C again: quit now "
                           "without saving)\n\ntrain.main: second Ctrl-C: quitting without saving; the last "
                           "checkpoint is kept\n")


def test_stop_signals_cover_term_usr1_and_int_and_start_clear():
    before = {sig: signal.getsignal(sig) for sig in checkpoint.STOP_SIGNALS}
    assert set(checkpoint.STOP_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
    with checkpoint.StopSignals() as signals:
        assert signals.received is None and signals.name == ""
        assert all(signal.getsignal(sig) == signals._handle for sig in checkpoint.STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.received == signal.SIGTERM and signals.name == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in checkpoint.STOP_SIGNALS} == before


def test_ctrl_c_handler_in_process(monkeypatch):
    """The handler itself (the subprocess test above cannot be attributed to it by a mutation tester)."""
    written = []

    class Quit(Exception):
        pass

    def quit_now(code):
        raise Quit(code)

    signals = checkpoint.StopSignals()
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, "write", lambda fd, data: written.append((fd, data)) or len(data))
        patch.setattr(checkpoint.os, "_exit", quit_now)
        signals._handle(signal.SIGTERM, None)
        assert signals.received == signal.SIGTERM and written == []
        signals._handle(signal.SIGINT, None)  # Ctrl-C after a SIGTERM: the first Ctrl-C, save and stop
        assert signals.received == signal.SIGINT and written == [(2, b"\ntrain.main: Ctrl-C: saving at the next "
                                                                    b"step, then exiting (Ctrl-C again: quit now "
                                                                    b"without saving)\n")]
        signals._handle(signal.SIGUSR1, None)  # another signal after Ctrl-C: no quitting
        assert signals.received == signal.SIGUSR1 and len(written) == 1
        signals.received = signal.SIGINT
        with pytest.raises(Quit) as caught:
            signals._handle(signal.SIGINT, None)
    assert caught.value.args == (130,)
    assert written[1] == (2, b"\ntrain.main: second Ctrl-C: quitting without saving; the last checkpoint is kept\n")
