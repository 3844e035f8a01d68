"""Ctrl-C (and SIGTERM) in `python -m preprocess.shard`, sent to the whole process group as a terminal does:
one hint line and exit 75, no worker tracebacks, and re-running the same command finishes with the bytes of
an uninterrupted run. A worker killed as the out-of-memory killer would (SIGKILL to that worker alone): one
line and exit 5, never a hang, and the same resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess import shard
from tests.conftest import write_synthetic_parquet
from tests.test_shard import shard_cli, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--images-per-shard", 20, "--max-side", 96, "--reencode", "always"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """400 train and 100 val images of 128 px: a few seconds of work for two workers."""
    src = tmp_path_factory.mktemp("interrupt-parquet")
    write_synthetic_parquet(src, per_class=40, val_per_class=10, size=128)
    return src


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interrupt-reference")
    shard.run(str(source), out, settings=shard.EncodeSettings(max_side=96, reencode="always"), images_per_shard=20,
              workers=1, progress=False)
    return out


def workers_of(pid: int) -> list[int]:
    """The spawned worker processes of `pid` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start_with_sigint_ignored() -> None:
    """As a script's background job (`cmd &` in a non-interactive shell) starts it: SIGINT ignored, inherited.
    CI's runner may start the suite so; preprocess.shard must stop on Ctrl-C all the same."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_until_a_shard_is_written(out: Path, args: list) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.shard", "--no-progress", "--workers", "2",
                             *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
                            preexec_fn=_start_with_sigint_ignored)
    # The val shards are written first, while both workers still have the train split to encode.
    deadline = time.monotonic() + 120
    while not list(out.glob("val/shard-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, "worker-killed"],
                         ids=["ctrl-c", "sigterm", "worker-killed"])
def test_interrupt_is_one_line_exit_75_and_resumes_to_identical_bytes(signum, source, reference, tmp_path):
    out = tmp_path / "out"
    args = ["--src", source, "--out", out, *ARGS]
    proc = run_until_a_shard_is_written(out, args)
    try:
        assert proc.poll() is None and list(out.glob("val/shard-*.json")), "no shard finished while it ran"
        workers = workers_of(proc.pid)
        assert len(workers) == 2, workers
        if signum == "worker-killed":
            os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer: that worker alone, no warning
        else:
            os.killpg(proc.pid, signum)  # the whole group, workers included, as a terminal's Ctrl-C
        _, stderr = proc.communicate(timeout=60)  # multiprocessing.Pool waited forever for the lost task
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be interrupted"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    if signum == "worker-killed":
        assert proc.returncode == shard.EXIT_WORKER_DIED == 5, stderr
        assert "a worker process died (killed by SIGKILL" in lines[0] and "fewer --workers" in lines[0], lines[0]
    else:
        assert proc.returncode == shard.EXIT_INTERRUPTED == 75, stderr
        assert "re-run the same command to resume" in lines[0] and f"{out / '.work'}/" in lines[0]
    deadline = time.monotonic() + 30  # no worker outlives the run (a zombie awaiting its reaper is gone too)
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], "workers outlived the run"
    resumed = shard_cli(*args, "--workers", 2)
    assert "already complete" in resumed.stdout  # the interrupted run's finished shards were kept
    assert tree_bytes(out) == tree_bytes(reference)


def test_a_full_disk_is_one_line_exit_4_and_a_rerun_resumes_to_identical_bytes(source, reference, tmp_path):
    """A write that fails (here a file size limit below one shard, as a full disk or a quota would) stops the run
    with one line naming the file, the free space and the fix; the re-run with room finishes the same shards."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    out = tmp_path / "out"
    args = ["--src", source, "--out", out, *ARGS]
    failed = subprocess.run([sys.executable, "-m", "preprocess.shard", "--no-progress", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
                            preexec_fn=limit)
    assert failed.returncode == shard.EXIT_WRITE_FAILED == 4, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert lines[0].startswith(f"preprocess.shard: error: could not write {out}/") and "GiB free on its disk" in lines[0]
    assert "free space" in lines[0] and "re-run the same command" in lines[0]
    assert not (out / "manifest.json").exists()
    shard_cli(*args)
    assert tree_bytes(out) == tree_bytes(reference)


def test_an_error_outside_the_output_is_not_called_a_write_failure(tmp_path):
    import errno

    out = tmp_path / "out"
    source = shard.write_failure(OSError(errno.ENOENT, "No such file or directory", "/data/src/x.parquet"), out)
    assert source == ("could not use /data/src/x.parquet (No such file or directory); check the source under "
                      "--src, then re-run")
    denied = shard.write_failure(OSError(errno.EACCES, "Permission denied", str(out / "train" / "a.tar.tmp")), out)
    assert denied.startswith(f"could not write {out}/train/a.tar.tmp (Permission denied; ")
    assert "pick an --out you can write to" in denied and "145 GB" not in denied


def test_help_documents_the_exit_status():
    text = subprocess.run([sys.executable, "-m", "preprocess.shard", "--help"], cwd=ROOT, capture_output=True,
                          text=True).stdout
    assert "75" in text and "Ctrl-C" in text and "re-run" in text
    assert "4 the output could not be written" in " ".join(text.split())
