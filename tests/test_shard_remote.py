"""preprocess.shard reading parquet from S3 (moto's server on 127.0.0.1, named the standard AWS way by
AWS_ENDPOINT_URL): the same bytes as from a local copy, no credentials in the output or the manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.sources import public_url
from tests.test_aws_s3 import BUCKET, CREDENTIALS, endpoint, need_boto3  # noqa: F401  (fixture)
from tests.test_shard import shard_bytes

ROOT = Path(__file__).resolve().parents[1]
SECRET = "remote-test-secret-key-0123"  # moto accepts any key; it must never be printed or stored


@pytest.fixture(scope="module")
def s3_source(endpoint, synthetic_parquet):  # noqa: F811
    """The session's synthetic parquet set uploaded to s3://BUCKET/imagenet-1k/data/."""
    boto3, _ = need_boto3()
    client = boto3.client("s3", endpoint_url=endpoint)
    for f in sorted(synthetic_parquet.rglob("*.parquet")):
        client.upload_file(str(f), BUCKET, f"imagenet-1k/{f.relative_to(synthetic_parquet).as_posix()}")
    return f"s3://{BUCKET}/imagenet-1k"


def shard_remote(endpoint: str, *args) -> subprocess.CompletedProcess:  # noqa: F811
    env = {**os.environ, **CREDENTIALS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "preprocess.shard", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def test_s3_source_gives_the_local_bytes(endpoint, s3_source, shards_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = shard_remote(endpoint, "--src", s3_source, "--out", out, "--images-per-shard", 50, "--workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "val"):
        assert shard_bytes(out / split) == shard_bytes(shards_dir / split), split
    manifest = (out / "manifest.json").read_text()
    assert f'"path": "{s3_source}"' in manifest
    for text in (manifest, proc.stdout, proc.stderr):
        assert SECRET not in text


def test_s3_glob_selects_files(endpoint, s3_source, tmp_path):  # noqa: F811
    proc = shard_remote(endpoint, "--src", f"{s3_source}/data/validation-*.parquet", "--out", tmp_path / "out",
                        "--splits", "val", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val: 70 images" in proc.stdout


@pytest.mark.parametrize("url,needle", [(f"s3://{BUCKET}/nothing-here", "no .parquet files"),
                                        ("s3://no-such-bucket/data", "no-such-bucket")])
def test_s3_without_parquet_is_one_line_exit_2(endpoint, s3_source, url, needle, tmp_path):  # noqa: F811
    proc = shard_remote(endpoint, "--src", url, "--out", tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr


def test_public_url_drops_credentials_and_query():
    assert public_url("s3://AKIA:secret@bucket/prefix?versionId=3") == "s3://bucket/prefix"
    assert public_url("hf://datasets/ILSVRC/imagenet-1k/data") == "hf://datasets/ILSVRC/imagenet-1k/data"
    assert public_url("/local/path") == "/local/path"
