"""The shard writer's worker processes, built so that neither a dead worker nor Ctrl-C can hang the run.

Why not `multiprocessing.Pool`: a worker that dies (the kernel's out-of-memory killer, a `kill -9`) takes its
task with it, and `Pool.imap_unordered` then waits for that result forever; `Pool.terminate()` itself can
block on a queue lock that a killed worker held. `concurrent.futures.ProcessPoolExecutor` notices a dead
worker (BrokenProcessPool), which becomes `WorkerDied`: one line, and the finished shards are kept. On
Ctrl-C, SIGTERM or an error the workers are killed outright; everything they write is renamed into place
only when complete, so a killed worker loses only the shard it was encoding.

Workers ignore SIGINT and SIGTERM: a terminal's Ctrl-C reaches the whole process group, and the parent
alone stops the run, instead of every worker printing a traceback. A worker whose parent is gone exits at
its next read of the task queue.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkerDied(RuntimeError):
    """A worker process ended without returning its task's result."""


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _ready() -> None:
    """The no-op task that starts each worker."""


def describe_exit(code: int) -> str:
    """How a finished worker ended: its signal (with the OOM killer's hint for SIGKILL) or exit status."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


class Workers:
    """`n` spawned worker processes that run `fn` over jobs, at most `2 * n` in flight (a lazily built job
    list is consumed as results come back). Use as a context manager: leaving it normally waits for the
    workers to exit; leaving it with an exception (KeyboardInterrupt included) kills them."""

    def __init__(self, n: int, fn: Callable):
        self.fn, self.depth = fn, 2 * n
        self.executor = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_ignore_stop_signals)
        # Start all n now, with the stop signals ignored here: an ignored signal stays ignored across exec, so
        # a worker is covered while it still imports, before its initializer runs. (The executor starts one
        # worker per submitted task while none is idle.)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} if main else {}
        try:
            for _ in range(n):
                self.executor.submit(_ready)  # its result is nothing: it only starts a worker
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.processes = list(getattr(self.executor, "_processes", {}).values())

    def imap_unordered(self, jobs: Iterable) -> Iterator:
        jobs = iter(jobs)
        pending, exhausted = set(), False
        while True:
            while not exhausted and len(pending) < self.depth:
                try:
                    pending.add(self.executor.submit(self.fn, next(jobs)))
                except StopIteration:
                    exhausted = True
                except BrokenProcessPool:
                    raise self.died() from None
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise self.died() from None
                yield result

    def died(self) -> WorkerDied:
        for process in self.processes:
            process.join(timeout=1)
        codes = sorted({describe_exit(p.exitcode) for p in self.processes if p.exitcode not in (None, 0)})
        how = "; ".join(codes) or "it exited"
        return WorkerDied(f"a worker process died ({how}) before finishing its task")

    def kill(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.executor.shutdown(wait=True)
        else:
            self.kill()
