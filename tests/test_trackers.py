"""train/trackers.py with the real packages and no network: MLflow into a local file store gets the config,
every epoch of metrics.jsonl and the final top-1, and a resumed run logs into the same MLflow run; W&B offline
writes the same numbers into its run; a missing package is exit 2 with one line; a tracker that fails leaves
one warning and a finished training run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_train import ROOT, metrics, train_cmd
from train import trackers
from train.config import ConfigError


def train(data: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(data, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_mlflow_gets_config_epochs_final_top1_and_a_resume_continues_its_run(shards_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 refuses its file store unless asked: a server (or sqlite, not in mlflow-skinny) is its default
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = tmp_path / "run"
    first = train(shards_dir, out, env, "--run.tracker=mlflow", "--schedule.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    first_config = yaml.safe_load((out / "config.yaml").read_text())
    run_id = json.loads((out / "tracker.json").read_text())["mlflow"]["run_id"]
    second = train(shards_dir, out, env, "--run.tracker=mlflow", "--run.resume=force", "--schedule.epochs=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"tracker: mlflow run {run_id} (resumed)" in second.stdout
    assert "warning: tracker" not in first.stdout + second.stdout
    entry = json.loads((out / "tracker.json").read_text())["mlflow"]
    assert entry["run_id"] == run_id and entry["epochs_logged"] == 2

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the client that reads the run back
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]  # one run, not two
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in trackers.flatten(first_config).items()}
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "top1", "top5", "lr", "images_per_s", "seconds", "step", "resolution"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert history == [(r["epoch"], r[key]) for r in records], key  # each epoch once, as metrics.jsonl has it
    assert set(run.data.metrics) - {"final_top1", "best_top1"} == set(trackers.epoch_metrics(records[0])) | \
        set(trackers.epoch_metrics(records[1]))
    assert run.data.metrics["final_top1"] == records[-1]["top1"]
    assert run.data.metrics["best_top1"] == max(r["top1"] for r in records)
    uploaded = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.jsonl", "summary.csv", "log.txt", "config.json"} <= uploaded
    assert "model_final.pth" not in uploaded and str((out / "model_final.pth").resolve()) in run.data.tags["files"]


def wandb_records(path: Path) -> list:
    """The records of an offline run's transaction log (run-ID.wandb: a ':W&B' header, then LevelDB log blocks
    of 32 KiB holding protobuf Records): wandb 0.31 writes no files/wandb-summary.json offline, this is the run."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_epochs_and_the_final_top1(shards_dir, tmp_path):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb-dir"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "test-trackers",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    out = tmp_path / "run"
    proc = train(shards_dir, out, env, "--run.tracker=wandb", "--schedule.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: tracker" not in proc.stdout
    run_id = json.loads((out / "tracker.json").read_text())["wandb"]["run_id"]
    [run_dir] = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = metrics(out)
    assert (run_dir / "files" / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()

    def name(item):
        return item.key or ".".join(item.nested_key)

    summary, history = {}, {}
    for record in wandb_records(run_dir / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({name(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            row = {name(i): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
    assert summary["final_top1"] == records[-1]["top1"]
    assert summary["best_top1"] == max(r["top1"] for r in records if "top1" in r)
    assert str((out / "model_final.pth").resolve()) in summary["files"]
    for r in records:
        assert {k: history[r["epoch"]][k] for k in trackers.epoch_metrics(r)} == trackers.epoch_metrics(r)


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_package_is_exit_2_and_one_line(shards_dir, tmp_path, tracker):
    hide = f"import sys; sys.modules[{tracker!r}] = None; from train.main import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", hide, "--data", str(shards_dir), "--out", str(out), f"--run.tracker={tracker}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"the {tracker} package is not installed" in proc.stderr
    assert f"pip install 'imagenet-rn50[{tracker}]'" in proc.stderr
    assert not out.exists()


def test_mlflow_without_a_tracking_uri_is_refused(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        trackers.check_available("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    trackers.check_available("mlflow")
    trackers.check_available("none")


class FlakyBackend:
    """A tracker whose server goes away after the first epoch."""
    name = "mlflow"

    def __init__(self):
        self.logged, self.ended = [], []

    def start(self, run_id, config):
        return "run-1", "http://tracker"

    def log(self, metrics, epoch):
        if self.logged:
            raise ConnectionError("HTTPConnectionPool(host='tracker', port=5000): Max retries exceeded")
        self.logged.append(epoch)

    def finish(self, summary, files, small):
        raise AssertionError("a tracker switched off is not called again")

    end = finish


def test_a_tracker_failing_mid_run_warns_once_and_goes_quiet(tmp_path):
    lines = []
    backend = FlakyBackend()
    tracker = trackers.Tracker(backend, tmp_path, lines.append)
    tracker.start({"run": {"seed": 0}}, history=[])
    for epoch in (1, 2, 3):
        tracker.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "decode": "fused"})
    tracker.finish([{"epoch": 3, "top1": 0.5}], [])
    tracker.close("failed")
    assert backend.logged == [1]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "training goes on" in warnings[0] and "Max retries exceeded" in warnings[0]
    assert json.loads((tmp_path / "tracker.json").read_text())["mlflow"]["epochs_logged"] == 1


def test_an_unreachable_mlflow_server_does_not_stop_training(shards_dir, tmp_path):
    pytest.importorskip("mlflow")
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # port 9: refused
    out = tmp_path / "run"
    proc = train(shards_dir, out, env, "--run.tracker=mlflow", "--schedule.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: tracker mlflow failed")]
    assert len(warnings) == 1, proc.stdout
    assert [r["epoch"] for r in metrics(out)] == [1] and "top1" in metrics(out)[0]
    assert json.loads((out / "run.json").read_text())["state"] == "finished"
