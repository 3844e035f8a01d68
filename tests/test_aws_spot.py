"""deploy/aws/spot_watcher.py against a local IMDSv2 double on 127.0.0.1: token handshake, notice -> SIGUSR1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deploy.aws import spot_watcher

ROOT = Path(__file__).resolve().parents[1]
WATCHER = ROOT / "deploy" / "aws" / "spot_watcher.py"
NOTICE = {"action": "terminate", "time": "2026-11-28T16:00:00Z"}

# A trainer stand-in: on SIGUSR1 it "saves a checkpoint" (writes the signal name, and whether its data-loader
# child survived) and exits 75, like train.main. The child has no handler: SIGUSR1 would kill it.
TRAINER = r"""
import pathlib, signal, subprocess, sys, time
out, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
loader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def stop(signum, frame):
    time.sleep(0.2)  # a signal sent to the loader too would have landed by now
    out.write_text(signal.Signals(signum).name + (" loader-alive" if loader.poll() is None else " loader-killed"))
    loader.kill()
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
ready.write_text("ready")
time.sleep(60)
"""

# A torchrun stand-in: starts one worker and, like torchrun, exits 1 when the worker fails. It installs no
# SIGUSR1 handler, so if it were signalled it would die of the signal instead of exiting 1.
LAUNCHER = r"""
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
sys.exit(0 if worker.wait() == 0 else 1)
"""


class FakeImds(ThreadingHTTPServer):
    """Plays IMDSv2: PUT /latest/api/token, then GETs need the token (401 without); 404 until a notice is set."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens: set[str] = set()
        self.notice: dict | None = None
        self.puts = self.gets = self.unauthorized = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeImds

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._reply(400)
        with self.server.lock:
            self.server.puts += 1
            token = f"token-{self.server.puts}"
            self.server.tokens.add(token)
        self._reply(200, token.encode())

    def do_GET(self):
        with self.server.lock:
            if self.headers.get("X-aws-ec2-metadata-token") not in self.server.tokens:
                self.server.unauthorized += 1
                return self._reply(401)
            self.server.gets += 1
            notice = self.server.notice
        if self.path != "/latest/meta-data/spot/instance-action" or notice is None:
            return self._reply(404, b"Not Found")
        self._reply(200, json.dumps(notice).encode())


@pytest.fixture
def imds():
    server = FakeImds()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_client_speaks_imdsv2(imds):
    with pytest.raises(urllib.error.HTTPError) as err:  # the double really refuses IMDSv1-style requests
        urllib.request.urlopen(imds.url + "/latest/meta-data/spot/instance-action", timeout=2)
    assert err.value.code == 401
    client = spot_watcher.Imds(imds.url)
    assert client.spot_notice() is None  # 404: no interruption pending
    assert client.spot_notice() is None
    assert imds.puts == 1  # the token is reused while valid
    imds.tokens.clear()  # the token expires: one 401, a new token, the same answer
    imds.notice = NOTICE
    assert client.spot_notice() == NOTICE
    assert imds.puts == 2


def start_trainer(tmp_path: Path, launcher: bool = False) -> tuple[subprocess.Popen, Path]:
    out, ready = tmp_path / "checkpointed", tmp_path / "ready"
    cmd = [sys.executable, "-c", LAUNCHER, TRAINER, str(out), str(ready)] if launcher else \
          [sys.executable, "-c", TRAINER, str(out), str(ready)]
    proc = subprocess.Popen(cmd)
    wait_for(ready.exists, what="the trainer's SIGUSR1 handler")
    return proc, out


@pytest.mark.parametrize("mode", ["pid", "children"])
def test_notice_makes_the_trainer_checkpoint_and_exit_75(imds, tmp_path, mode):
    trainer, out = start_trainer(tmp_path, launcher=mode == "children")
    notice_file = tmp_path / "logs" / "spot-notice.json"
    watcher = subprocess.Popen([sys.executable, str(WATCHER), f"--{mode}", str(trainer.pid), "--interval", "0.05",
                                "--base-url", imds.url, "--notice-file", str(notice_file)],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: imds.gets >= 3, what="the watcher's polls")
        assert trainer.poll() is None and not out.exists()  # 404s signal nobody
        imds.notice = NOTICE
        assert trainer.wait(timeout=10) == (1 if mode == "children" else 75)  # the launcher itself was spared
        assert out.read_text() == "SIGUSR1 loader-alive"  # and so were the trainer's own children
        assert watcher.wait(timeout=10) == 0
        assert json.loads(notice_file.read_text()) == NOTICE
        assert imds.unauthorized == 0  # every GET carried the token
    finally:
        for proc in (trainer, watcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_watcher_exits_quietly_off_ec2(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, like a missing metadata service
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        proc = subprocess.run([sys.executable, str(WATCHER), "--pid", str(sleeper.pid), "--interval", "0.05",
                               "--base-url", url], capture_output=True, text=True, timeout=20)
        assert proc.returncode == 0 and "not on EC2" in proc.stderr
        assert sleeper.poll() is None  # nobody was signalled
    finally:
        sleeper.kill()
        sleeper.wait()


def test_watcher_stops_when_the_trainer_is_gone(imds):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    proc = subprocess.run([sys.executable, str(WATCHER), "--pid", str(gone.pid), "--interval", "0.05",
                           "--base-url", imds.url], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and "targets exited" in proc.stderr


def test_children_are_the_direct_children_only(tmp_path):
    launcher, _ = start_trainer(tmp_path, launcher=True)  # launcher -> trainer -> loader
    kids = spot_watcher.children(launcher.pid)
    grandkids = [g for k in kids for g in spot_watcher.children(k)]
    try:
        assert len(kids) == 1 and len(grandkids) == 1 and launcher.pid not in kids
    finally:
        for pid in grandkids + kids:
            try:
                spot_watcher.os.kill(pid, 9)
            except ProcessLookupError:
                pass
        launcher.wait()
