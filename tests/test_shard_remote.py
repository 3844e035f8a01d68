"""preprocess.shard reading parquet from S3 (moto's server on 127.0.0.1, named the standard AWS way by
AWS_ENDPOINT_URL): the same bytes as from a local copy, no credentials in the output or the manifest.
Every way a remote source fails that can be made offline (no credentials, no network, access denied, no
such bucket or repo, a gated dataset, HF_HUB_OFFLINE) is one line on stderr with the fix, exit 2, and no
URL in it carries a password or a query string. The Hub's answers come from a stand-in server on 127.0.0.1
(HF_ENDPOINT) that replies as huggingface.co does: 404 RepoNotFound, 401 GatedRepo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from preprocess.remote import redact, remote_problem
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


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeHub(BaseHTTPRequestHandler):
    """ILSVRC/imagenet-1k is gated (its files answer 401 GatedRepo to a request without a token that has
    access); every other repo does not exist (404 RepoNotFound)."""

    GATED = "ILSVRC/imagenet-1k"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        if f"/{self.GATED}" not in self.path:
            return self.reply(404, {"error": "Repository not found"},
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if "/resolve/" in self.path:
            return self.reply(401, {"error": "gated"}, {
                "X-Error-Code": "GatedRepo",
                "X-Error-Message": f"Access to dataset {self.GATED} is restricted. You must have access to it and "
                                   f"be authenticated to access it. Please log in."})
        if "/tree/" in self.path:
            return self.reply(200, [{"type": "file", "oid": "a" * 40, "size": 1000,
                                     "path": "data/validation-00000-of-00001.parquet",
                                     "lfs": {"oid": "b" * 64, "size": 1000, "pointerSize": 134}}])
        return self.reply(200, {"id": self.GATED, "sha": "c" * 40, "gated": "manual", "private": False,
                                "siblings": []})

    do_HEAD = do_GET


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def iam_users(endpoint, s3_source):  # noqa: F811
    """Access keys of two IAM users of the moto server: one with no permission, one that may only list."""
    boto3, _ = need_boto3()
    iam = boto3.client("iam", endpoint_url=endpoint)
    keys = {}
    for user, actions in (("nobody", []), ("lister", ["s3:ListBucket"])):
        iam.create_user(UserName=user)
        if actions:
            iam.put_user_policy(UserName=user, PolicyName="list", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": f"arn:aws:s3:::{BUCKET}"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    return keys


@pytest.fixture
def iam_checks(iam_users):
    """moto's server (in this process) checks signatures and IAM policies for the duration of one test."""
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        yield iam_users


def failed_once(*args, drop=(), **env) -> str:
    """Run preprocess.shard expecting the one-line failure; returns that line."""
    env = {**os.environ, **CREDENTIALS, "AWS_SECRET_ACCESS_KEY": SECRET, "HF_HUB_OFFLINE": "1",
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard", **env}  # one try: a refused connection fails fast
    for name in drop:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "preprocess.shard", "--no-progress", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert SECRET not in proc.stderr and env.get("AWS_SECRET_ACCESS_KEY", SECRET) not in proc.stderr
    return lines[0]


def test_no_aws_credentials(endpoint, s3_source, tmp_path):  # noqa: F811
    line = failed_once("--src", s3_source, "--out", tmp_path / "out", AWS_ENDPOINT_URL=endpoint,
                       AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                       AWS_CONFIG_FILE=str(tmp_path / "none"),
                       drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"))
    assert f"--src {s3_source}: no AWS credentials found" in line and "AWS_ACCESS_KEY_ID" in line


def test_no_network_to_s3(tmp_path):
    line = failed_once("--src", f"s3://{BUCKET}/imagenet-1k", "--out", tmp_path / "out",
                       AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}")
    assert "cannot reach the server" in line and "check the network" in line


def test_no_such_bucket(endpoint, tmp_path):  # noqa: F811
    line = failed_once("--src", "s3://no-such-bucket-rn50/data", "--out", tmp_path / "out", AWS_ENDPOINT_URL=endpoint)
    assert "--src s3://no-such-bucket-rn50/data: no such bucket; check the bucket name" in line


@pytest.mark.parametrize("user,needle", [
    ("nobody", f"--src s3://{BUCKET}/imagenet-1k: access denied"),  # cannot even list the bucket
    ("lister", f"s3://{BUCKET}/imagenet-1k/data/"),  # lists it, then cannot read a file: the file is named
    ("unknown", "access denied (An error occurred (InvalidAccessKeyId)"),  # a key S3 does not know
])
def test_access_denied(user, needle, endpoint, s3_source, iam_checks, tmp_path):  # noqa: F811
    keys = iam_checks.get(user, {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": SECRET})
    line = failed_once("--src", s3_source, "--out", tmp_path / "out", AWS_ENDPOINT_URL=endpoint, **keys)
    assert needle in line and "access denied" in line and "s3:GetObject" in line


def test_credentials_in_an_s3_url_are_refused_and_never_printed(tmp_path):
    line = failed_once("--src", f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/imagenet-1k?token=q-secret", "--out",
                       tmp_path / "out")
    assert line.endswith(f"--src s3://{BUCKET}/imagenet-1k: s3:// takes no credentials in the URL; remove the "
                         f"'user:...@' part and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    assert "AKIAEXAMPLE" not in line and "q-secret" not in line


def test_any_url_in_a_message_is_redacted(tmp_path):
    line = failed_once("--src", f"https://reader:{SECRET}@127.0.0.1:{closed_port()}/data/train-0.parquet?sig=q-secret",
                       "--out", tmp_path / "out")
    assert "https://127.0.0.1:" in line and "cannot reach the server" in line
    assert "reader" not in line and "q-secret" not in line
    # What botocore or the Hub may say, quoting a signed URL or the bucket name with the secret in it.
    src = f"s3://AKIAEXAMPLE:{SECRET}@bucket/data"
    said = (f'Could not connect to "https://u:{SECRET}@s3.amazonaws.com/bucket?X-Amz-Signature=abc&x=1"; '
            f'Invalid bucket name "AKIAEXAMPLE:{SECRET}@bucket"')
    text = redact(said, src)
    assert SECRET not in text and "AKIAEXAMPLE" not in text and "X-Amz-Signature" not in text
    assert "https://s3.amazonaws.com/bucket;" in text.replace('"', "")
    assert remote_problem(ZeroDivisionError(), "s3://bucket/data") is None  # a bug of ours still raises


def test_hub_offline_mode(tmp_path):
    line = failed_once("--src", "hf://datasets/ILSVRC/imagenet-1k/data", "--out", tmp_path / "out", HF_HUB_OFFLINE="1")
    assert "HF_HUB_OFFLINE=1 is set" in line and "hf download ILSVRC/imagenet-1k --repo-type dataset" in line


def test_hub_unreachable(tmp_path):
    line = failed_once("--src", "hf://datasets/ILSVRC/imagenet-1k/data", "--out", tmp_path / "out",
                       HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert "--src hf://datasets/ILSVRC/imagenet-1k/data: cannot reach the server" in line and "HF_ENDPOINT" in line


def test_hub_no_such_repo(fake_hub, tmp_path):
    line = failed_once("--src", "hf://datasets/nobody/no-such-set/data", "--out", tmp_path / "out",
                       HF_HUB_OFFLINE="0", HF_ENDPOINT=fake_hub, HF_TOKEN="", HF_HOME=str(tmp_path / "hf"))
    assert "--src hf://datasets/nobody/no-such-set/data: no such repo on the Hub" in line and "hf auth login" in line


def test_hub_gated_dataset_without_token(fake_hub, tmp_path):
    line = failed_once("--src", "hf://datasets/ILSVRC/imagenet-1k/data", "--out", tmp_path / "out",
                       HF_HUB_OFFLINE="0", HF_ENDPOINT=fake_hub, HF_TOKEN="", HF_HOME=str(tmp_path / "hf"))
    assert "ILSVRC/imagenet-1k is a gated dataset" in line
    assert "accept its terms at https://huggingface.co/datasets/ILSVRC/imagenet-1k" in line and "hf auth login" in line
