"""Checkpoint files: atomic writes, `weights_only` loads, RNG capture, and the stop-signal flag.

A checkpoint (RUN_DIR/checkpoints/last.pt, best.pt) is a dict of tensors and plain containers only,
so `torch.load(path, weights_only=True)` reads it:
  format        int, CHECKPOINT_FORMAT
  epoch, step   0-based epoch in progress and optimizer steps already done in it (step 0: epoch start)
  global_step   optimizer steps done since the start of training
  world_size    processes that wrote it (a mid-epoch data position only maps onto the same count)
  model         torchvision state_dict (the un-wrapped, un-compiled module)
  optimizer, scaler, ema (or None)
  ranks         per rank: {"data": loader.state_dict(), "rng": capture_rng(), "meter": {...}}
  best_top1     best validation top-1 so far (-1.0 before the first validation)
  history       the metrics.jsonl records so far (the file is rewritten from this on resume)
  config        the resolved config as a nested dict
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
# Ctrl-C (SIGINT) is a stop request like the others: save, then exit 75; a second Ctrl-C quits at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full, file size limit) so
                free = shutil.disk_usage(path.parent).free
                raise OSError(errno.EIO, f"write failed after {f.tell()} bytes, {free / 2**30:.2f} GiB free on the "
                                         f"disk ({str(exc).splitlines()[0][:120]})") from exc
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def host_copy(obj):
    """`obj` with every tensor replaced by a copy in host memory (containers rebuilt, other values shared): a
    snapshot that the next optimizer step cannot change, for a write that runs while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs checkpoint writes one at a time in a thread, so that training goes on while a file is written.

    `submit(work)` first waits for the write before it (at most one is pending: memory for one snapshot) and
    returns that write's error message, or None; `wait()` does the same without starting another. `work`
    returns an error message or None. A write in progress when the process is killed leaves the previous
    file (writes are atomic), so a resume loses at most the steps since that file."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _run(self, work) -> None:
        try:
            self._error = work()
        except BaseException as exc:  # reported by the next wait(), in the training thread
            self._error = f"{type(exc).__name__}: {exc}"

    def wait(self) -> str | None:
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        return error

    def submit(self, work) -> str | None:
        error = self.wait()
        if error is None:
            self._thread = threading.Thread(target=self._run, args=(work,), name="checkpoint-writer", daemon=False)
            self._thread.start()
        return error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(Path(dst).parent)


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file replaced in one rename: readers see the old or the new contents, never a part."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json_dict(path: Path) -> dict:
    """A small JSON object file, or {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def link_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes another name of `src`'s current file (no copy; `src` is later replaced by rename, so
    `dst` keeps these bytes); a copy where the filesystem has no hard links."""
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)
    _fsync_dir(Path(dst).parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng(device: torch.device) -> dict:
    """Every RNG this process might draw from, as tensors and ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignals:
    """Turns SIGTERM / SIGUSR1 / SIGINT into a flag the training loop polls at step boundaries.

    Use as a context manager; the previous handlers come back on exit.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            os.write(2, b"\ntrain.main: second Ctrl-C: quitting without saving; the last checkpoint is kept\n")
            os._exit(EXIT_INTERRUPTED)
        if signum == signal.SIGINT:
            os.write(2, b"\ntrain.main: Ctrl-C: saving at the next step, then exiting (Ctrl-C again: quit now "
                        b"without saving)\n")
        self.received = signum

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
