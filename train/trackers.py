"""Optional experiment trackers (`--run.tracker=mlflow|wandb`), as timm's `--log-wandb`: rank 0 only.

What a tracker run gets: the resolved config once (MLflow params; W&B config), each epoch's numbers from
metrics.jsonl (train_loss, top1, top5, lr, images_per_s, seconds, ...) with the epoch as the step, and at the
end final_top1 / best_top1, the small files of RUN_DIR (config, metrics, log; weights stay in the run folder,
their paths are recorded) and the run's end state (finished, stopped, failed).
RUN_DIR/tracker.json keeps each tracker's run id and how many epochs it holds, so a resumed run logs into the
same tracker run, and epochs it missed (tracker switched on later, a stop between checkpoint and log) are sent
when it opens.

The tracker never stops training: a missing package is refused before training (exit 2, `check_available`),
but a tracker that fails later (server unreachable, login missing) gives one warning line and is switched off
for the rest of the run; metrics.jsonl stays the record.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from train import checkpoint
from train.config import ConfigError

STATE_FILE = "tracker.json"
UPLOAD_MAX_BYTES = 10 * 2**20  # files up to this size are uploaded; weights are only named
# tracker -> (module to import, setup.cfg extra)
PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# Fail fast on an unreachable MLflow server: its defaults (7 retries, 120 s each) can hold rank 0, and with it
# every rank, for many minutes. Set these variables yourself to choose otherwise.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def check_available(name: str) -> None:
    """Raises ConfigError (one line) when `run.tracker=name` cannot work here: its package is not installed,
    or (MLflow) no MLFLOW_TRACKING_URI says where to log. Cheap (no import); every rank gets the same answer."""
    if name == "none":
        return
    module, extra = PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"--run.tracker={name}: the {module} package is not installed; install it with "
                          f"pip install 'imagenet-rn50[{extra}]' (from a checkout: pip install '.[{extra}]')")
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("--run.tracker=mlflow: set MLFLOW_TRACKING_URI to the tracking server (http://HOST:5000, "
                          "databricks); MLFLOW_EXPERIMENT_NAME picks the experiment")


def open_tracker(name: str, run_dir: Path, config: dict, history: list[dict],
                 say: Callable[[str], None]) -> "Tracker | None":
    """The tracker run for RUN_DIR (resumed when tracker.json names one), with the epochs of `history` it lacks
    already sent; None for `none`."""
    if name == "none":
        return None
    backend = {"mlflow": MlflowBackend, "wandb": WandbBackend}[name](Path(run_dir))
    tracker = Tracker(backend, Path(run_dir), say)
    tracker.start(config, history)
    return tracker


def epoch_metrics(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line, under the same names (the epoch is the step, not a metric)."""
    return {k: v for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


class Tracker:
    """Rank 0's link to one tracker run. After its first error it warns once and does nothing more."""

    def __init__(self, backend, run_dir: Path, say: Callable[[str], None]):
        self.backend, self.say = backend, say
        self.path = run_dir / STATE_FILE
        self.entry = dict(checkpoint.read_json_dict(self.path).get(backend.name, {}))
        self.active = True

    def start(self, config: dict, history: list[dict]) -> None:
        previous = self.entry.get("run_id")
        ok, opened = self.guard("start", lambda: self.backend.start(previous, config))
        if not ok:
            return
        run_id, where = opened
        if run_id != previous:
            self.entry = {"run_id": run_id, "epochs_logged": 0}
        self.entry["where"] = where
        self.say(f"tracker: {self.backend.name} run {run_id} ({'resumed' if run_id == previous else 'new'}): {where}")
        for record in history:
            self.log_epoch(record)  # the epochs this tracker run does not have yet
        self.guard("start", self.save_entry)

    def log_epoch(self, record: dict) -> None:
        if not self.active or record["epoch"] <= self.entry.get("epochs_logged", 0):
            return

        def send():
            self.backend.log(epoch_metrics(record), record["epoch"])
            self.entry["epochs_logged"] = record["epoch"]
            self.save_entry()

        self.guard("log", send)

    def finish(self, history: list[dict], files: list[Path]) -> None:
        """The run ended normally: final/best top-1, the files, state finished."""
        evaluated = [r["top1"] for r in history if "top1" in r]
        summary = {"final_top1": evaluated[-1], "best_top1": max(evaluated)} if evaluated else {}
        small = [f for f in files if f.stat().st_size <= UPLOAD_MAX_BYTES]
        self.guard("finish", lambda: self.backend.finish(summary, [str(f.resolve()) for f in files], small))
        self.close("finished")

    def close(self, state: str) -> None:
        """End the tracker run as finished, stopped or failed (once; later calls do nothing)."""
        if self.active:
            self.guard("close", lambda: self.backend.end(state))
            self.active = False

    def save_entry(self) -> None:
        stored = checkpoint.read_json_dict(self.path)
        stored[self.backend.name] = self.entry
        checkpoint.write_text_atomic(self.path, json.dumps(stored, indent=1) + "\n")

    def guard(self, what: str, call: Callable) -> tuple[bool, object]:
        """(True, `call()`), or (False, None) after one warning line (and the tracker off) when it raises."""
        if not self.active:
            return False, None
        try:
            return True, call()
        except Exception as exc:  # noqa: BLE001 -- any tracker fault: the run goes on
            self.active = False
            reason = " ".join(str(exc).split()) or type(exc).__name__
            reason = reason if len(reason) <= 300 else reason[:300] + "..."
            self.say(f"warning: tracker {self.backend.name} failed ({what}: {type(exc).__name__}: {reason}); "
                     f"training goes on without it, metrics.jsonl is the record")
            return False, None


class MlflowBackend:
    """MLflow through its fluent API: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (or _ID) choose where."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def start(self, run_id: str | None, config: dict) -> tuple[str, str]:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow

        self.mlflow = mlflow
        if run_id:  # reopens it (state RUNNING again); its params are the first session's
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(run_name=self.run_dir.resolve().name, tags={"run_dir": str(self.run_dir.resolve())})
            mlflow.log_params(flatten(config))
        return run.info.run_id, f"{mlflow.get_tracking_uri()}, experiment {run.info.experiment_id}"

    def log(self, metrics: dict, epoch: int) -> None:
        self.mlflow.log_metrics(metrics, step=epoch)

    def finish(self, summary: dict, files: list[str], small: list[Path]) -> None:
        if summary:
            self.mlflow.log_metrics(summary)
        self.mlflow.set_tag("files", ", ".join(files))
        for path in small:
            self.mlflow.log_artifact(str(path))

    def end(self, state: str) -> None:
        self.mlflow.end_run(status=self.STATUS[state])


class WandbBackend:
    """Weights & Biases: WANDB_PROJECT (default imagenet-rn50), WANDB_ENTITY, WANDB_MODE=offline, WANDB_DIR
    (default RUN_DIR: its wandb/ folder) as W&B reads them."""

    name = "wandb"
    EXIT_CODES = {"finished": 0, "stopped": 75, "failed": 1}

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def start(self, run_id: str | None, config: dict) -> tuple[str, str]:
        import wandb

        self.run = wandb.init(id=run_id, resume="allow", name=self.run_dir.resolve().name,
                              project=None if os.environ.get("WANDB_PROJECT") else "imagenet-rn50",
                              dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir))
        # allow_val_change: a resumed run may have changed keys that do not change training (RESUME_SAFE)
        self.run.config.update(config, allow_val_change=True)
        if self.run.offline:
            return self.run.id, f"offline in {Path(self.run.dir).parent} (upload: wandb sync that folder)"
        return self.run.id, self.run.url

    def log(self, metrics: dict, epoch: int) -> None:
        self.run.log(metrics, step=epoch)

    def finish(self, summary: dict, files: list[str], small: list[Path]) -> None:
        self.run.summary.update({**summary, "files": files})
        for path in small:  # the files of run.dir go up with the run (wandb.save would symlink, with a warning each)
            shutil.copyfile(path, Path(self.run.dir) / path.name)

    def end(self, state: str) -> None:
        self.run.finish(exit_code=self.EXIT_CODES[state])
