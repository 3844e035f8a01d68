"""The run folder's lifecycle: which state a RUN_DIR is in and which requests it accepts.

States (RUN_DIR/run.json records them; checkpoints/last.pt and a lock file are the ground truth):
  new        no checkpoints/last.pt: train from scratch
  running    another process holds RUN_DIR/.lock (an flock: a killed process lets go of it at once)
  stopped    last.pt before the last epoch (a signal, a crash, a spot interruption): resume from it
  finished   run.json says so, or last.pt reached schedule.epochs and model_final.pth exists

Requests (`--run.resume`):
  auto   new -> start; stopped -> resume if the settings are the checkpoint's (keys in config.RESUME_SAFE
         aside); finished -> refuse (its best.pt and model_final.pth stay as they are).
  force  also continue a finished run past its end (schedule.epochs raised; its final files move to
         finished-epoch-N/ first) or resume a stopped one with changed settings.
Every refusal is one line (ConfigError) that names the run, what is in the way and the way out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from train import checkpoint, config
from train.config import Config, ConfigError

STATE_FILE = "run.json"
LOCK_FILE = ".lock"
# What a finished run hands over; force-continuing moves them aside instead of overwriting them.
FINAL_FILES = ("model_final.pth", "model.safetensors", "config.json", "checkpoints/best.pt")


@dataclass
class Plan:
    """What this invocation will do with RUN_DIR."""
    state: str  # new | stopped | finished (as found)
    checkpoint: dict | None  # last.pt's contents when resuming
    notes: list[str]  # lines to print (settings that changed but are safe, archived files)


def check_out_dir(run_dir: Path) -> None:
    """An --out that can be a run folder: a folder or nothing yet, inside a folder we can write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file, not a run folder; pick a folder path")
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {run_dir}: {parent} is not writable; pick a folder you can write to")


class RunLock:
    """An exclusive flock on RUN_DIR/.lock for the life of the run (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"--out {self.path.parent}: in use by {holder}; wait for that run to end or stop it "
                              f"(SIGTERM saves and exits 75), or pick another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"train.main pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def read_state(run_dir: Path) -> dict:
    return checkpoint.read_json_dict(Path(run_dir) / STATE_FILE)


def write_state(run_dir: Path, state: str, **facts) -> None:
    """RUN_DIR/run.json: the state and what led to it (written atomically; rank 0 only)."""
    record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
              "host": socket.gethostname(), **facts}
    checkpoint.write_text_atomic(Path(run_dir) / STATE_FILE, json.dumps(record, indent=1) + "\n")


def finished_epochs(run_dir: Path, saved: dict | None) -> int | None:
    """The epoch count a finished run ended at, or None when the run in RUN_DIR has not finished."""
    state = read_state(run_dir)
    if state.get("state") == "finished":
        return int(state.get("epochs", saved["epoch"] if saved else 0))
    if saved is not None and (Path(run_dir) / "model_final.pth").is_file() and saved["step"] == 0 \
            and saved["epoch"] >= saved["config"]["schedule"]["epochs"]:
        return int(saved["epoch"])  # a run from before run.json existed
    return None


def plan(run_dir: Path, cfg: Config, data_fingerprint: str | None = None) -> Plan:
    """Decide what to do with RUN_DIR for `cfg`; raises ConfigError (one line) for a request that would
    damage the folder. Read-only: `archive_finished` does the one change a forced continuation needs."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return Plan("new", None, [])
    saved = checkpoint.load(last)
    if saved.get("format") != checkpoint.CHECKPOINT_FORMAT:
        raise ConfigError(f"{last}: checkpoint format {saved.get('format')!r}, expected "
                          f"{checkpoint.CHECKPOINT_FORMAT}; use a new --out")
    force = cfg.run.resume == "force"
    notes = []
    done = finished_epochs(run_dir, saved)
    if done is not None:
        top1 = _best_top1(saved)
        if not force:
            raise ConfigError(f"--out {run_dir}: this run finished ({done} epochs{top1}); its files are kept as they "
                              f"are. To train it further on purpose: --run.resume=force --schedule.epochs=N (N > "
                              f"{done}); for another run: a new --out")
        if cfg.schedule.epochs <= done:
            raise ConfigError(f"--run.resume=force: {run_dir} already finished {done} epochs; set "
                              f"--schedule.epochs above {done} to continue it, or use a new --out")
    stored_data = saved.get("data_fingerprint")
    if data_fingerprint and stored_data and stored_data != data_fingerprint and not force:
        raise ConfigError(f"--out {run_dir}: {last} was trained on other shards (manifest fingerprint {stored_data} "
                          f"-> {data_fingerprint}); pass the run's own --data (see {run_dir / 'config.yaml'}), "
                          f"a new --out, or --run.resume=force to continue on these")
    changed = config.differences(saved["config"], cfg, ignore=config.RESUME_SAFE)
    if done is not None:
        changed = [line for line in changed if not line.startswith("schedule.epochs:")]
    if changed and not force:
        raise ConfigError(f"--out {run_dir}: {last} was trained with other settings ({'; '.join(changed)}); "
                          f"resume with the run's own: --config {run_dir / 'config.yaml'}, or start a new --out, "
                          f"or pass --run.resume=force to continue with the new ones")
    notes += [f"warning: --run.resume=force: setting changed since the checkpoint: {line}" for line in changed]
    safe = [line for line in config.differences(saved["config"], cfg) if line.split(":", 1)[0] in config.RESUME_SAFE]
    notes += [f"note: changed since the checkpoint (does not change what is trained): {line}" for line in safe]
    return Plan("finished" if done is not None else "stopped", saved, notes)


def _best_top1(saved: dict) -> str:
    best = saved.get("best_top1", -1.0)
    return f", best top-1 {100 * best:.2f} %" if isinstance(best, float) and best >= 0 else ""


def archive_finished(run_dir: Path, epochs: int) -> Path:
    """Move a finished run's final files into RUN_DIR/finished-epoch-N/ (before it is trained further)."""
    dest = Path(run_dir) / f"finished-epoch-{epochs}"
    dest.mkdir(exist_ok=True)
    for name in FINAL_FILES:
        src = Path(run_dir) / name
        if src.is_file():
            os.replace(src, dest / Path(name).name)
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        (dest / "metrics.jsonl").write_bytes(metrics.read_bytes())
    return dest


def keep_epoch_checkpoint(last: Path, epoch: int, keep: int) -> None:
    """checkpoints/epoch-NNN.pt for the epoch just saved in `last` (a hard link: last.pt is replaced by rename,
    so the old file lives on under this name); only the newest `keep` are kept."""
    folder = last.parent
    if keep > 0:
        checkpoint.link_atomic(last, folder / f"epoch-{epoch:03d}.pt")
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep or None]:
        old.unlink(missing_ok=True)
