"""train.main end to end on the CPU: a short run learns, two gloo processes count every val image once,
model_final.pth is a plain torchvision ResNet-50, a diverging run stops with the step and exit 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from preprocess.manifest import load_manifest, split_size

ROOT = Path(__file__).resolve().parents[1]
# A ResNet-18 at 32 -> 64 px on batches of 16: a few seconds per epoch on two cores.
# The tiny runs were tuned at smoke's former rate; pinned so that a preset change does not move them.
TINY = ["--config", "smoke", "--optim.lr_per_256=0.8", "--model.arch=resnet18", "--data.batch_size=16", "--data.num_threads=1",
        "--val.batch_size=35", "--schedule.res_min=32", "--schedule.res_max=64", "--val.res=64",
        "--run.tensorboard=false", "--checkpoint.every_minutes=0", "--run.sync_every=1"]


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out), *TINY, *extra]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_learns(shards_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(shards_dir, out, "--schedule.epochs=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert {"train_loss", "top1", "top5", "lr", "resolution", "images_per_s", "seconds"} <= set(records[-1])
    assert records[-1]["resolution"] == 64 and records[0]["resolution"] == 32
    chance = 1 / load_manifest(shards_dir)["num_classes"]
    assert records[-1]["top1"] >= 2 * chance, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "final top-1" in proc.stdout
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "best.pt").is_file()


def test_model_final_is_a_torchvision_resnet50(shards_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(shards_dir, out, "--model.arch=resnet50", "--model.blurpool=true",
                         "--data.batch_size=50", "--schedule.epochs=1", "--val.flip_tta=false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(out / "model_final.pth", weights_only=True)
    model = torchvision.models.resnet50(num_classes=load_manifest(shards_dir)["num_classes"])
    model.load_state_dict(weights, strict=True)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(weights[k], last["model"][k]) for k in weights)


def test_two_gloo_processes_count_every_val_image_once(shards_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main",
           "--data", str(shards_dir), "--out", str(out), *TINY, "--schedule.epochs=1", "--checkpoint.every_steps=3",
           "--ema.enabled=true"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = metrics(out)[-1]
    assert record["val_images"] == split_size(load_manifest(shards_dir), "val")
    assert 0 <= record["top1_raw"] <= 1  # with EMA on, both the EMA and the raw weights are evaluated
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and len(last["ranks"]) == 2 and last["ema"]["updates"] == last["global_step"]
    assert last["ranks"][0]["data"]["rank"] == 0 and last["ranks"][1]["data"]["rank"] == 1
    assert proc.stdout.count("final top-1") == 1  # rank 1 is quiet


def test_non_finite_loss_stops_with_the_step(shards_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(shards_dir, out, "--schedule.epochs=2", "--schedule.warmup_epochs=0",
                         "--optim.lr_per_256=1e30", "--checkpoint.every_steps=1"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in message and "at optimizer step" in message and "last good checkpoint" in message
    assert "Traceback" not in proc.stderr
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    state = json.loads((out / "run.json").read_text())  # the folder says why it stopped
    assert state["state"] == "failed" and state["exit"] == 3 and "non-finite loss" in state["reason"]
