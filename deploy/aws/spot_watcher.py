"""Spot interruption watcher: polls EC2 instance metadata (IMDSv2) and asks the trainer to checkpoint.

    python deploy/aws/spot_watcher.py --children TORCHRUN_PID [--interval 5] [--notice-file PATH]
    python deploy/aws/spot_watcher.py --pid TRAINER_PID [--pid ...]

EC2 posts a spot interruption notice about two minutes before it reclaims the instance, at
/latest/meta-data/spot/instance-action (404 until then). IMDSv2 wants a session token first: PUT
/latest/api/token with X-aws-ec2-metadata-token-ttl-seconds, then every GET carries X-aws-ec2-metadata-token.
On a notice the watcher writes the notice to --notice-file (so the launcher knows not to restart locally),
sends SIGUSR1 to the targets (train.main then saves checkpoints/last.pt within seconds and exits 75), and
exits. `--children PID` signals the direct children of PID, which for torchrun are its workers: not torchrun
itself (it dies of SIGUSR1 instead of forwarding it), and not the workers' own children (data-loader processes
die of SIGUSR1, which would crash the trainer before it saves). Off EC2 (no metadata service) it exits quietly.
Standard library only, so it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # the IMDSv2 maximum, 6 hours
HTTP_TIMEOUT_S = 2.0  # the metadata service is link-local: it answers in milliseconds or not at all


class MetadataUnavailable(OSError):
    """No instance metadata service answered (not on EC2, or IMDS disabled)."""


class Imds:
    """A minimal IMDSv2 client: one session token, renewed before it expires or when refused (401)."""

    def __init__(self, base_url: str = IMDS_URL, token_ttl_s: int = TOKEN_TTL_S):
        self.base_url = base_url.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            raise MetadataUnavailable(f"{method} {self.base_url}{path}: {err}") from err

    def token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}
            status, body = self._request("PUT", TOKEN_PATH, ttl)
            if status != 200:
                raise MetadataUnavailable(f"PUT {self.base_url}{TOKEN_PATH}: HTTP {status}")
            self._token = body.decode().strip()
            self._token_expires = time.monotonic() + self.token_ttl_s - 60  # renew a minute early
        return self._token

    def get(self, path: str) -> tuple[int, bytes]:
        """GET with the session token; one retry with a fresh token if the old one is refused."""
        for attempt in range(2):
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
            if status != 401 or attempt:
                return status, body
            self._token = None
        return status, body

    def spot_notice(self) -> dict | None:
        """The pending interruption ({"action": "terminate", "time": "..."}) or None (HTTP 404)."""
        status, body = self.get(NOTICE_PATH)
        if status == 404:
            return None
        if status != 200:
            raise MetadataUnavailable(f"GET {self.base_url}{NOTICE_PATH}: HTTP {status}")
        try:
            return json.loads(body)
        except ValueError:
            return {"action": "unknown", "raw": body.decode(errors="replace")}


def children(parent_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of the live direct children of parent_pid, from /proc/<pid>/stat."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent_pid:  # field 4; the name in (...) may contain spaces
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def send(sig: int, pids: list[int] = (), parent: int | None = None, pgid: int | None = None) -> list[int]:
    """Signals the targets; returns the PIDs (or -PGID) actually signalled."""
    targets = list(pids) + (children(parent) if parent is not None else [])
    sent = []
    for pid in targets:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
            sent.append(-pgid)
        except ProcessLookupError:
            pass
    return sent


def targets_alive(pids: list[int], parent: int | None, pgid: int | None) -> bool:
    if pgid is not None:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            pass
    return any(alive(p) for p in pids) or (parent is not None and alive(parent))


def log(message: str) -> None:
    print(f"[spot_watcher {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def watch(imds: Imds, pids: list[int], parent: int | None, pgid: int | None, sig: int, interval_s: float,
          notice_file: Path | None, max_unreachable: int = 3) -> int:
    """Polls until a notice (signal the targets, return 0), the targets exit, or IMDS never answers."""
    reached, failures = False, 0
    while targets_alive(pids, parent, pgid):
        try:
            notice = imds.spot_notice()
            reached, failures = True, 0
        except MetadataUnavailable as err:
            failures += 1
            if not reached and failures >= max_unreachable:
                log(f"no instance metadata service ({err}); not on EC2? stopping")
                return 0
            log(f"metadata request failed ({err}); retrying")
            notice = None
        if notice is not None:
            if notice_file is not None:
                notice_file.parent.mkdir(parents=True, exist_ok=True)
                notice_file.write_text(json.dumps(notice) + "\n")
            sent = send(sig, pids, parent, pgid)
            log(f"spot interruption notice {notice}: sent {signal.Signals(sig).name} to {sent or 'nobody (all gone)'}")
            return 0
        time.sleep(interval_s)
    log("targets exited; stopping")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python deploy/aws/spot_watcher.py",
                                description="Watch for an EC2 spot interruption notice (IMDSv2), signal the trainer.")
    p.add_argument("--pid", type=int, action="append", default=[], help="signal this PID (repeatable)")
    p.add_argument("--children", type=int, default=None,
                   help="signal the direct children of this PID (torchrun's workers), not the PID itself")
    p.add_argument("--pgid", type=int, default=None, help="signal this whole process group")
    p.add_argument("--signal", default="SIGUSR1",
                   help="signal name (default SIGUSR1: train.main saves last.pt and exits 75)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="seconds between polls (default 5; the notice comes ~120 s early)")
    p.add_argument("--base-url", default=os.environ.get("IMDS_URL", IMDS_URL),
                   help=f"metadata service (default $IMDS_URL or {IMDS_URL})")
    p.add_argument("--notice-file", type=Path, default=None, help="write the notice JSON here before signalling")
    args = p.parse_args(argv)
    if not (args.pid or args.children is not None or args.pgid is not None):
        p.error("give at least one target: --pid, --children or --pgid")
    try:
        args.signal = signal.Signals[args.signal if args.signal.startswith("SIG") else "SIG" + args.signal]
    except KeyError:
        p.error(f"--signal {args.signal}: not a signal name (e.g. SIGUSR1, SIGTERM)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return watch(Imds(args.base_url), args.pid, args.children, args.pgid, args.signal, args.interval, args.notice_file)


if __name__ == "__main__":
    sys.exit(main())
