"""deploy/aws/s3sync.py against moto's S3 server on 127.0.0.1: checkpoint upload, resume on a fresh instance."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.aws import s3sync

ROOT = Path(__file__).resolve().parents[1]
S3SYNC = ROOT / "deploy" / "aws" / "s3sync.py"
BUCKET = "rn50-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def need_boto3():
    """boto3 and moto are required, not optional: a missing one fails with the install command."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        pytest.fail(f"{err}: the AWS tests need boto3 and moto's S3 server: pip install -e '.[aws]' 'moto[server]'")
    return boto3, ThreadedMotoServer


@pytest.fixture(scope="module")
def endpoint():
    boto3, ThreadedMotoServer = need_boto3()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # fake keys: moto accepts anything, and nothing can reach real AWS
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def client(endpoint):
    boto3, _ = need_boto3()
    return boto3.client("s3", endpoint_url=endpoint)


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def make_run_dir(root: Path) -> Path:
    """What train.main leaves in RUN_DIR, plus the temp files and extras the mirror must skip."""
    write(root / "checkpoints" / "last.pt", b"epoch 3 weights" * 1000)
    write(root / "checkpoints" / "best.pt", b"epoch 2 weights" * 1000)
    write(root / "checkpoints" / ".last.pt.tmp4242", b"half-written")  # train.main's temp + rename
    write(root / "metrics.jsonl", b'{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')
    write(root / "config.yaml", b"schedule:\n  epochs: 24\n")
    write(root / "tensorboard" / "events.out.tfevents.1", b"tb")
    write(root / "logs" / "attempt-1.log", b"log")
    return root


def test_push_uploads_checkpoints_once(endpoint, client, tmp_path):
    run = make_run_dir(tmp_path / "run")
    mirror = s3sync.S3Mirror(f"s3://{BUCKET}/runs/a", endpoint_url=endpoint)
    uploaded = mirror.push(run)
    expected = {"checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "config.yaml"}
    assert set(uploaded) == expected == keys(client, "runs/a")
    assert mirror.push(run) == []  # nothing changed
    assert s3sync.S3Mirror(f"s3://{BUCKET}/runs/a", endpoint_url=endpoint).push(run) == []  # a new process agrees
    write(run / "checkpoints" / "last.pt", b"epoch 4 weights" * 1000)  # the trainer saves again
    assert mirror.push(run) == ["checkpoints/last.pt"]
    body = client.get_object(Bucket=BUCKET, Key="runs/a/checkpoints/last.pt")["Body"].read()
    assert body == b"epoch 4 weights" * 1000


def test_fresh_instance_resumes_from_s3(endpoint, tmp_path):
    old = make_run_dir(tmp_path / "instance-a" / "run")
    s3sync.S3Mirror(f"s3://{BUCKET}/runs/b", endpoint_url=endpoint).push(old)
    new = tmp_path / "instance-b" / "run"  # the replacement instance: empty NVMe
    mirror = s3sync.S3Mirror(f"s3://{BUCKET}/runs/b", endpoint_url=endpoint)
    pulled = mirror.pull(new)
    assert set(pulled) == {"checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "config.yaml"}
    for rel in pulled:
        assert (new / rel).read_bytes() == (old / rel).read_bytes()
        assert (new / rel).stat().st_mtime_ns == (old / rel).stat().st_mtime_ns
    assert not list(new.rglob(".*"))  # no temp files left behind
    assert mirror.push(new) == []  # what was just pulled is not uploaded again
    assert mirror.pull(new) == []


def test_pull_replaces_older_and_keeps_newer_local_files(endpoint, tmp_path):
    now = time.time()
    src = tmp_path / "src"
    write(src / "checkpoints" / "last.pt", b"s3 epoch 5", mtime=now - 100)
    write(src / "checkpoints" / "best.pt", b"s3 epoch 4", mtime=now - 100)
    s3sync.S3Mirror(f"s3://{BUCKET}/runs/c", endpoint_url=endpoint).push(src)
    local = tmp_path / "local"
    write(local / "checkpoints" / "last.pt", b"local epoch 3", mtime=now - 1000)  # older than S3's: replaced
    write(local / "checkpoints" / "best.pt", b"local epoch 6", mtime=now)  # newer (upload lost): kept
    pulled = s3sync.S3Mirror(f"s3://{BUCKET}/runs/c", endpoint_url=endpoint).pull(local)
    assert pulled == ["checkpoints/last.pt"]
    assert (local / "checkpoints" / "last.pt").read_bytes() == b"s3 epoch 5"
    assert (local / "checkpoints" / "best.pt").read_bytes() == b"local epoch 6"


def test_shard_cache_copies_everything_with_the_manifest_last(endpoint, client, tmp_path):
    shards = tmp_path / "shards"
    for i in range(3):
        write(shards / "train" / f"shard-{i:06d}.tar", os.urandom(2000))
        write(shards / "train" / f"shard-{i:06d}.idx", b"0 1 2")
    write(shards / "manifest.json", b"{}")
    write(shards / ".complete", b"")  # bootstrap.sh's local marker stays local
    mirror = s3sync.S3Mirror(f"s3://{BUCKET}/shards/x", endpoint_url=endpoint)
    pushed = mirror.push(shards, ("**",), last="manifest.json")
    assert pushed[-1] == "manifest.json" and len(pushed) == 7
    assert ".complete" not in keys(client, "shards/x")
    pulled = s3sync.S3Mirror(f"s3://{BUCKET}/shards/x", endpoint_url=endpoint).pull(tmp_path / "copy", ("**",),
                                                                                  last="manifest.json")
    assert pulled[-1] == "manifest.json" and sorted(pulled) == sorted(pushed)
    assert (tmp_path / "copy" / "train" / "shard-000002.tar").read_bytes() == \
           (shards / "train" / "shard-000002.tar").read_bytes()


def test_cli_exists_ensure_bucket_and_errors(endpoint, client, tmp_path, capsys):
    def cli(*args: str) -> tuple[int, str]:
        code = s3sync.main(["--endpoint-url", endpoint, *args])
        return code, capsys.readouterr().err

    run = make_run_dir(tmp_path / "run")
    assert cli("push", str(run), f"s3://{BUCKET}/runs/d")[0] == 0
    assert cli("exists", f"s3://{BUCKET}/runs/d/checkpoints/last.pt")[0] == 0
    assert cli("exists", f"s3://{BUCKET}/runs/d/model_final.pth")[0] == 1
    code, err = cli("push", str(run), "s3://no-such-bucket-rn50/runs/d")
    assert code == 2 and "no such bucket" in err
    assert cli("exists", "s3://no-such-bucket-rn50/x")[0] == 2  # an error is not a "no"
    code, err = cli("ensure-bucket", "s3://rn50-new-bucket", "--region", "eu-west-1")
    assert code == 0 and "created" in err
    assert "rn50-new-bucket" in {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert "found" in cli("ensure-bucket", "s3://rn50-new-bucket")[1]
    code, err = cli("push", str(run), "not-a-url")
    assert code == 2 and "expected s3://BUCKET" in err


def test_watch_uploads_changes_and_flushes_on_sigterm(endpoint, client, tmp_path):
    """The mirror as bootstrap.sh runs it: a separate process, stopped with SIGTERM at the end of training."""
    run = make_run_dir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(S3SYNC), "--endpoint-url", endpoint, "watch", str(run),
                             f"s3://{BUCKET}/runs/e", "--interval", "0.2"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + 20
        while "checkpoints/last.pt" not in keys(client, "runs/e"):
            assert time.monotonic() < deadline and proc.poll() is None, "watch never uploaded"
            time.sleep(0.1)
        write(run / "model_final.pth", b"final weights")  # written just before the stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "model_final.pth" in keys(client, "runs/e")  # the last push on SIGTERM caught it
