"""Mirror a run folder (or the shard folder) to S3 and back, so a new instance resumes where the last one stopped.

    python deploy/aws/s3sync.py push  RUN_DIR s3://BUCKET/runs/NAME            # once
    python deploy/aws/s3sync.py watch RUN_DIR s3://BUCKET/runs/NAME --interval 30   # until SIGTERM, then a last push
    python deploy/aws/s3sync.py pull  s3://BUCKET/runs/NAME RUN_DIR            # before (re)starting the trainer
    python deploy/aws/s3sync.py push  SHARDS s3://BUCKET/shards/ID --include '**' --last manifest.json
    python deploy/aws/s3sync.py exists s3://BUCKET/shards/ID/manifest.json     # exit 0 if present, 1 if not
    python deploy/aws/s3sync.py ensure-bucket s3://BUCKET --region us-east-1

Each object carries the local file's mtime (metadata `mtime-ns`), so both directions copy a file only when
the other side is missing it or holds an older version; a pulled file gets the remote mtime back, so the
next push skips it. Uploads read from one open file handle: train.main replaces last.pt by rename, and a
handle keeps the old inode, so an object is never a mix of two checkpoints. Downloads land in a temp file
and are renamed into place, so the trainer never sees a partial last.pt. `--last NAME` is copied after
everything else in both directions: a present manifest.json means a complete shard set.
Credentials and region come from the usual boto3 chain (instance role on EC2); --endpoint-url (or
AWS_ENDPOINT_URL) points it at any S3-compatible server, which is how the tests run it.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# What a run folder needs to resume and to show results; see train/main.py for who writes what.
RUN_PATTERNS = ("checkpoints/*.pt", "model_final.pth", "model.safetensors", "config.json", "run.json", "metrics.jsonl",
                "config.yaml", "*.png")
MTIME_KEY = "mtime-ns"
WORKERS = 16  # parallel transfers; S3 throughput scales with concurrent requests


class SyncError(RuntimeError):
    """A bad URL, a missing bucket, or refused credentials; the message says which."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix') with no trailing slash."""
    if not url.startswith("s3://") or len(url) <= 5:
        raise SyncError(f"{url!r}: expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise SyncError(f"{url!r}: no bucket name")
    return bucket, prefix.strip("/")


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def is_temporary(rel: str) -> bool:
    """Files being written: train.main's '.name.tmpPID' and the usual temp suffixes."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") or name.endswith((".tmp", ".partial", ".part")) or ".tmp" in name


def matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return not is_temporary(rel) and any(p == "**" or fnmatch.fnmatchcase(rel, p) for p in patterns)


def local_files(root: Path, patterns: tuple[str, ...]) -> list[str]:
    if not root.is_dir():
        return []
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if matches(r, patterns))


def _ordered(rels: list[str], last: str | None) -> tuple[list[str], list[str]]:
    """(everything else, the --last file if present): the marker goes after the rest."""
    if last and last in rels:
        return [r for r in rels if r != last], [last]
    return rels, []


class S3Mirror:
    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None, client=None):
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            import boto3  # deferred: `--help` and the URL checks work without boto3 installed

            client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                                  region_name=region)
        self.s3 = client
        self._pushed: dict[str, tuple[int, int]] = {}  # rel -> (mtime_ns, size) known to be in S3
        self._lock = threading.Lock()
        self._bucket_ok = False

    def url(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{_key(self.prefix, rel)}"

    def _error(self, err: Exception) -> SyncError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return SyncError(f"s3://{self.bucket}: no such bucket; create it with "
                             f"`python deploy/aws/s3sync.py ensure-bucket s3://{self.bucket}` or `aws s3 mb`")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return SyncError(f"s3://{self.bucket}: access denied ({code}); does the instance role allow S3?")
        return SyncError(f"{self.url()}: {err}")

    def check_bucket(self) -> None:
        """Fails with a clear message if the bucket is missing or unreadable (a HEAD on a key cannot tell)."""
        from botocore.exceptions import ClientError

        if self._bucket_ok:
            return
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                err.response["Error"]["Code"] = "NoSuchBucket"
            raise self._error(err) from err
        self._bucket_ok = True

    # -- remote state ---------------------------------------------------------------------------------
    def remote_files(self) -> dict[str, int]:
        """rel -> size of every object under the prefix."""
        from botocore.exceptions import ClientError

        found, start = {}, (self.prefix + "/") if self.prefix else ""
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    found[obj["Key"][len(start):]] = obj["Size"]
        except ClientError as err:
            raise self._error(err) from err
        return found

    def remote_state(self, rel: str) -> tuple[int, int] | None:
        """(mtime_ns, size) of one object, or None if absent."""
        from botocore.exceptions import ClientError

        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=_key(self.prefix, rel))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(err) from err
        return int(head.get("Metadata", {}).get(MTIME_KEY, 0)), int(head["ContentLength"])

    def exists(self, rel: str) -> bool:
        self.check_bucket()
        return self.remote_state(rel) is not None

    # -- push -----------------------------------------------------------------------------------------
    def _push_one(self, root: Path, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            f = open(root / rel, "rb")
        except FileNotFoundError:  # replaced or removed since the listing
            return False
        with f:
            st = os.fstat(f.fileno())
            state = (st.st_mtime_ns, st.st_size)
            with self._lock:
                known = self._pushed.get(rel)
            if known is None:
                known = self.remote_state(rel)
            if known == state:
                with self._lock:
                    self._pushed[rel] = state
                return False
            try:
                self.s3.upload_fileobj(f, self.bucket, _key(self.prefix, rel),
                                       ExtraArgs={"Metadata": {MTIME_KEY: str(st.st_mtime_ns)}})
            except ClientError as err:
                raise self._error(err) from err
        with self._lock:
            self._pushed[rel] = state
        return True

    def push(self, root: Path, patterns: tuple[str, ...] = RUN_PATTERNS, last: str | None = None) -> list[str]:
        """Uploads new or changed files; returns the relative paths uploaded."""
        self.check_bucket()
        first, final = _ordered(local_files(root, patterns), last)
        with ThreadPoolExecutor(WORKERS) as pool:
            uploaded = pool.map(lambda r: self._push_one(root, r), first)
            done = [rel for rel, up in zip(first, uploaded, strict=True) if up]
        return done + [rel for rel in final if self._push_one(root, rel)]

    # -- pull -----------------------------------------------------------------------------------------
    def _pull_one(self, root: Path, rel: str) -> bool:
        from botocore.exceptions import ClientError

        remote = self.remote_state(rel)
        if remote is None:
            return False
        path = root / rel
        try:
            st = path.stat()
            if st.st_mtime_ns >= remote[0]:  # ours is as new or newer: keep it (a later push uploads it)
                return False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.s3tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                self.s3.download_fileobj(self.bucket, _key(self.prefix, rel), f)
            if remote[0]:
                os.utime(tmp, ns=(remote[0], remote[0]))
            os.replace(tmp, path)
        except ClientError as err:
            raise self._error(err) from err
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self._pushed[rel] = remote
        return True

    def pull(self, root: Path, patterns: tuple[str, ...] = RUN_PATTERNS, last: str | None = None) -> list[str]:
        """Downloads what S3 has newer than (or missing from) root; returns the relative paths written."""
        self.check_bucket()
        first, final = _ordered(sorted(r for r in self.remote_files() if matches(r, patterns)), last)
        with ThreadPoolExecutor(WORKERS) as pool:
            written = pool.map(lambda r: self._pull_one(root, r), first)
            done = [rel for rel, got in zip(first, written, strict=True) if got]
        return done + [rel for rel in final if self._pull_one(root, rel)]

    def watch(self, root: Path, patterns: tuple[str, ...], interval_s: float, stop: threading.Event) -> None:
        """push every interval_s until stop is set, then one last push."""
        while not stop.wait(interval_s):
            try:
                for rel in self.push(root, patterns):
                    log(f"uploaded {rel} -> {self.url(rel)}")
            except Exception as err:  # noqa: BLE001  a network blip must not end the mirror; the next round retries
                log(f"upload failed, retrying in {interval_s:g} s: {type(err).__name__}: {err}")
        for rel in self.push(root, patterns):
            log(f"uploaded {rel} -> {self.url(rel)}")

    def ensure_bucket(self, region: str | None) -> bool:
        """Creates the bucket if it does not exist; True if created."""
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(err) from err
        kwargs = {"Bucket": self.bucket}
        if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.s3.create_bucket(**kwargs)
        except ClientError as err:
            raise self._error(err) from err
        return True


def log(message: str) -> None:
    print(f"[s3sync {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    def common(parser: argparse.ArgumentParser, default) -> None:  # accepted before or after the command
        parser.add_argument("--endpoint-url", default=default,
                            help="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
        parser.add_argument("--region", default=default, help="AWS region (default: boto3's, e.g. $AWS_DEFAULT_REGION)")

    p = argparse.ArgumentParser(prog="python deploy/aws/s3sync.py", description=__doc__.split("\n\n")[0])
    common(p, None)
    shared = argparse.ArgumentParser(add_help=False)
    common(shared, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("push", "upload new or changed files once"),
                            ("watch", "push every --interval s until SIGTERM/SIGINT")):
        s = sub.add_parser(name, help=help_text, parents=[shared])
        s.add_argument("local", type=Path)
        s.add_argument("url")
        if name == "watch":
            s.add_argument("--interval", type=float, default=30.0, help="seconds between scans (default 30)")
    s = sub.add_parser("pull", help="download what S3 has newer than the local folder", parents=[shared])
    s.add_argument("url")
    s.add_argument("local", type=Path)
    for s in (sub.choices["push"], sub.choices["watch"], sub.choices["pull"]):
        s.add_argument("--include", action="append", default=None,
                       help="glob of relative paths, repeatable; '**' = everything "
                            f"(default: {' '.join(RUN_PATTERNS)})")
        s.add_argument("--last", default=None, help="relative path copied after all others (a completion marker)")
    s = sub.add_parser("exists", help="exit 0 if the object exists, 1 if not (2: error)", parents=[shared])
    s.add_argument("url")
    s = sub.add_parser("ensure-bucket", help="create the bucket if it does not exist", parents=[shared])
    s.add_argument("url")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "exists":
            bucket, key = parse_s3_url(args.url)
            return 0 if S3Mirror(f"s3://{bucket}", args.endpoint_url, args.region).exists(key) else 1
        mirror = S3Mirror(args.url, args.endpoint_url, args.region)
        if args.command == "ensure-bucket":
            log(f"{'created' if mirror.ensure_bucket(args.region) else 'found'} s3://{mirror.bucket}")
            return 0
        patterns = tuple(args.include) if args.include else RUN_PATTERNS
        if args.command == "push":
            done = mirror.push(args.local, patterns, args.last)
            log(f"uploaded {len(done)} file(s) to {mirror.url()}")
        elif args.command == "pull":
            done = mirror.pull(args.local, patterns, args.last)
            log(f"downloaded {len(done)} file(s) from {mirror.url()} to {args.local}")
        else:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            log(f"mirroring {args.local} -> {mirror.url()} every {args.interval:g} s")
            mirror.watch(args.local, patterns, args.interval, stop)
    except SyncError as err:
        print(f"s3sync: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # botocore's network and credential errors: one line, not a traceback
        if not type(err).__module__.startswith(("botocore", "boto3", "s3transfer")):
            raise
        print(f"s3sync: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
