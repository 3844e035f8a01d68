"""deploy/aws/bootstrap.sh: shellcheck, NVMe discovery on fake `lsblk` output, torchrun arguments, and the
train loop (restart on progress, exit 75 after a spot notice, S3 mirror) with a fake torchrun.

Every system command that could touch a disk (lsblk, mountpoint, mkfs.ext4, mdadm, mount, chown, sudo,
apt-get) is replaced by a logging fake on PATH, so the tests run unprivileged and change nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "deploy" / "aws" / "bootstrap.sh"

EBS_ROOT = """\
NAME="nvme0n1" MODEL="Amazon Elastic Block Store              " TYPE="disk" MOUNTPOINT="" PKNAME=""
NAME="nvme0n1p1" MODEL="" TYPE="part" MOUNTPOINT="/" PKNAME="nvme0n1"
NAME="nvme0n1p15" MODEL="" TYPE="part" MOUNTPOINT="/boot/efi" PKNAME="nvme0n1"
"""
STORE = 'NAME="nvme{i}n1" MODEL="Amazon EC2 NVMe Instance Storage        " TYPE="disk" MOUNTPOINT="" PKNAME=""\n'
ESCAPED_STORE = ('NAME="nvme{i}n1" MODEL="Amazon\\x20EC2\\x20NVMe\\x20Instance\\x20Storage" TYPE="disk" '
                 'MOUNTPOINT="" PKNAME=""\n')


def stores(n: int, line: str = STORE) -> str:
    return "".join(line.format(i=i) for i in range(1, n + 1))


def array(name: str, n: int, mountpoint: str = "") -> str:
    return "".join(f'NAME="{name}" MODEL="" TYPE="raid0" MOUNTPOINT="{mountpoint}" PKNAME="nvme{i}n1"\n'
                   for i in range(1, n + 1))


FAKES = {
    "lsblk": 'cat "$FAKE_LSBLK"',
    "mountpoint": 'grep -qxF -- "${@: -1}" "$FAKE_MOUNTED"',
    "sudo": 'echo "sudo $*" >> "$FAKE_LOG"; exec "$@"',
}
LOGGED = ("mkfs.ext4", "mdadm", "mount", "chown", "apt-get", "systemctl", "nvidia-smi")


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    scripts = dict(FAKES, **{name: f'echo "{name} $*" >> "$FAKE_LOG"' for name in LOGGED})
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def bootstrap(fake_bin: Path, tmp_path: Path, *args: str, lsblk: str = "", mounted: tuple[str, ...] = (),
              env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "lsblk.txt").write_text(lsblk)
    (tmp_path / "mounted.txt").write_text("".join(m + "\n" for m in mounted))
    log = tmp_path / "commands.log"
    log.write_text("")
    full_env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                "FAKE_LSBLK": str(tmp_path / "lsblk.txt"), "FAKE_MOUNTED": str(tmp_path / "mounted.txt"),
                "FAKE_LOG": str(log), "NVME_MOUNT": str(tmp_path / "mnt"), "FALLBACK_DIR": str(tmp_path / "rootvol"),
                **(env or {})}
    # its own session, so that whatever it leaves running can be found (and must not exist) afterwards
    popen = subprocess.Popen(["bash", str(BOOTSTRAP), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=full_env, start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
        assert not leftovers(popen.pid), f"bootstrap.sh {' '.join(args)} left processes running"
    finally:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait()
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    return proc, log.read_text().splitlines()


def leftovers(pgid: int, grace_s: float = 3.0) -> bool:
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI must install it")
    proc = subprocess.run(["shellcheck", "--severity=style", str(BOOTSTRAP)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# -- NVMe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [STORE, ESCAPED_STORE], ids=["padded-model", "hex-escaped-model"])
def test_one_instance_store_is_formatted_and_mounted(fake_bin, tmp_path, line):
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme", lsblk=EBS_ROOT + stores(1, line))
    mnt = str(tmp_path / "mnt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == mnt
    assert commands[0].startswith("mkfs.ext4 ") and commands[0].endswith(" /dev/nvme1n1")
    assert f"mount -o noatime /dev/nvme1n1 {mnt}" in commands
    assert not any("nvme0n1" in c for c in commands)  # the EBS root volume is never touched
    assert not any(c.startswith("mdadm") for c in commands)


def test_several_instance_stores_become_one_raid0(fake_bin, tmp_path):
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme", lsblk=EBS_ROOT + stores(8))  # p4d.24xlarge
    mnt = str(tmp_path / "mnt")
    assert proc.returncode == 0, proc.stderr
    devices = " ".join(f"/dev/nvme{i}n1" for i in range(1, 9))
    assert commands[0] == f"mdadm --create /dev/md0 --run --level=0 --raid-devices=8 {devices}"
    assert commands[1].startswith("mkfs.ext4 ") and commands[1].endswith(" /dev/md0")
    assert f"mount -o noatime /dev/md0 {mnt}" in commands
    assert proc.stdout.strip() == mnt


def test_no_instance_store_falls_back_to_the_root_volume(fake_bin, tmp_path):
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme", lsblk=EBS_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "rootvol") and (tmp_path / "rootvol").is_dir()
    assert commands == [] and "warning" in proc.stderr


def test_already_mounted_target_is_a_no_op(fake_bin, tmp_path):
    mnt = str(tmp_path / "mnt")
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme", lsblk=EBS_ROOT + stores(8) + array("md0", 8, mnt),
                               mounted=(mnt,))
    assert proc.returncode == 0 and proc.stdout.strip() == mnt and commands == []


def test_store_mounted_elsewhere_is_used_as_it_is(fake_bin, tmp_path):
    """Deep Learning AMIs mount the instance store themselves (e.g. at /opt/dlami/nvme)."""
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme",
                               lsblk=EBS_ROOT + stores(2) + array("md0", 2, "/opt/dlami/nvme"))
    assert proc.returncode == 0 and proc.stdout.strip() == "/opt/dlami/nvme" and commands == []


def test_existing_array_after_reboot_is_mounted_not_reformatted(fake_bin, tmp_path):
    proc, commands = bootstrap(fake_bin, tmp_path, "nvme", lsblk=EBS_ROOT + stores(4) + array("md127", 4))
    assert proc.returncode == 0, proc.stderr
    assert commands == [f"mount -o noatime /dev/md127 {tmp_path / 'mnt'}"]


# -- torchrun and the restart policy -----------------------------------------------------------------------


def test_torchrun_args_single_node(fake_bin, tmp_path):
    proc, _ = bootstrap(fake_bin, tmp_path, "torchrun-args", env={"GPUS": "1"})
    assert proc.stdout.split() == ["--standalone", "--nproc_per_node=1"]


def test_torchrun_args_from_skypilot_nodes(fake_bin, tmp_path):
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    proc, _ = bootstrap(fake_bin, tmp_path, "torchrun-args", env=env)
    assert proc.stdout.split() == ["--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.0.0.5",
                                   "--master_port=29500"]


@pytest.mark.parametrize("rc, notice, progress, codes, expected", [
    (0, 0, 1, [], "finished"),
    (1, 1, 1, ["75"], "spot"),        # a spot notice wins: leave, the scheduler resumes elsewhere
    (1, 0, 0, ["75"], "resume"),      # a worker asked to be resumed (torchrun itself exits 1)
    (75, 0, 0, [], "resume"),         # the trainer run without torchrun
    (1, 0, 1, ["3"], "stop"),         # diverged: the same data would diverge again
    (1, 0, 0, ["2"], "stop"),         # bad config or data folder
    (1, 0, 0, ["4"], "stop"),         # a checkpoint could not be written (disk full): a restart fails the same way
    (1, 0, 1, ["5"], "resume"),       # a rank stopped answering: restart from the last checkpoint
    (1, 0, 1, ["1"], "resume"),       # a crash after saving a newer last.pt
    (1, 0, 0, ["-9"], "retry"),       # killed without progress: counts towards MAX_FAILURES
])
def test_next_action(fake_bin, tmp_path, rc, notice, progress, codes, expected):
    proc, _ = bootstrap(fake_bin, tmp_path, "next-action", str(rc), str(notice), str(progress), *codes)
    assert proc.stdout.strip() == expected


def test_worker_exit_codes_from_a_torchrun_failure_summary(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("[rank0]: saved last.pt\ntrain.main FAILED\nFailures:\n  <NO_OTHER_FAILURES>\nRoot Cause:\n"
                   "[0]:\n  time      : 2026-11-28_15:23:20\n  rank      : 0 (local_rank: 0)\n"
                   "  exitcode  : 75 (pid: 7546)\n  error_file: <N/A>\n[1]:\n  exitcode  : 75 (pid: 7547)\n")
    proc = subprocess.run(["bash", "-c", 'source "$1" && worker_exit_codes "$2"', "bash", str(BOOTSTRAP), str(log)],
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["75"]


def test_service_unit_keeps_the_hf_token_out(fake_bin, tmp_path):
    proc, _ = bootstrap(fake_bin, tmp_path, "service-unit",
                        env={"BUCKET": "my-bucket", "HF_TOKEN": "hf_canary_value", "EPOCHS": "16"})
    assert proc.returncode == 0, proc.stderr
    assert '"BUCKET=my-bucket"' in proc.stdout and '"RUN_NAME=rn50-16ep-ec2"' in proc.stdout
    assert f"ExecStart=/bin/bash {BOOTSTRAP} all" in proc.stdout
    assert "hf_canary_value" not in proc.stdout


# -- the train loop, end to end with a fake torchrun --------------------------------------------------------

# Stands in for torchrun: runs one worker and, like torchrun, exits 1 with a failure summary if it fails.
FAKE_TORCHRUN = """#!/usr/bin/env bash
out=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
echo "torchrun $*" >> "$FAKE_LOG"
"$REAL_PYTHON" "$FAKE_WORKER" "$out" &
pid=$!
wait "$pid" && exit 0
rc=$?
printf 'Root Cause:\\n  exitcode  : %s (pid: %s)\\n' "$rc" "$pid" >&2
exit 1
"""

# Stands in for train.main. resume: saves last.pt and asks to be resumed, then finishes on the next start.
# spot: saves last.pt and exits 75 on SIGUSR1, like train.main's StopSignals. diverge: exits 3.
FAKE_WORKER = """
import os, pathlib, signal, sys, time
run = pathlib.Path(sys.argv[1]); ckpt = run / "checkpoints"; ckpt.mkdir(parents=True, exist_ok=True)
mode = os.environ["FAKE_MODE"]
if mode == "resume":
    if (ckpt / "last.pt").exists():
        (run / "model_final.pth").write_bytes(b"final:" + (ckpt / "last.pt").read_bytes())
        sys.exit(0)
    (ckpt / "last.pt").write_bytes(b"epoch 1")
    sys.exit(75)
if mode == "spot":
    def stop(signum, frame):
        (ckpt / "last.pt").write_bytes(b"saved on " + signal.Signals(signum).name.encode())
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    (run / "ready").write_text("ready")
    time.sleep(60)
if mode == "diverge":
    sys.exit(3)
"""


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    scripts = {"python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', "torchrun": FAKE_TORCHRUN}
    for name, text in scripts.items():
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    shards = tmp_path / "mnt" / "shards"
    shards.mkdir(parents=True)
    (shards / ".complete").touch()
    return venv


def train_env(tmp_path: Path, fake_venv: Path, mode: str, imds_url: str, **extra) -> dict:
    return {"VENV": str(fake_venv), "REAL_PYTHON": sys.executable, "FAKE_WORKER": str(tmp_path / "worker.py"),
            "FAKE_MODE": mode, "GPUS": "1", "RESTART_DELAY": "0", "SPOT_POLL": "0.05", "SYNC_INTERVAL": "0.2",
            "IMDS_URL": imds_url, "AWS_DEFAULT_REGION": "us-east-1", "HF_TOKEN": "hf_canary_value", **extra}


from tests.test_aws_s3 import BUCKET, CREDENTIALS, client, endpoint, keys  # noqa: E402,F401  (moto S3, loopback)
from tests.test_aws_spot import NOTICE, FakeImds  # noqa: E402  (IMDSv2 double on loopback)


@pytest.fixture
def imds():
    server = FakeImds()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_train_resumes_after_exit_75_and_mirrors_to_s3(fake_bin, fake_venv, tmp_path, endpoint, client, imds):
    env = train_env(tmp_path, fake_venv, "resume", imds.url, BUCKET=BUCKET, AWS_ENDPOINT_URL=endpoint, **CREDENTIALS)
    proc, commands = bootstrap(fake_bin, tmp_path, "train", mounted=(str(tmp_path / "mnt"),), env=env)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "mnt" / "runs" / "rn50-24ep-ec2"
    assert (run / "model_final.pth").read_bytes() == b"final:epoch 1"  # the second attempt resumed the first
    torchruns = [c for c in commands if c.startswith("torchrun ")]
    assert len(torchruns) == 2
    assert torchruns[0] == (f"torchrun --standalone --nproc_per_node=1 -m train.main --data {tmp_path}/mnt/shards "
                            f"--out {run} --config rn50 --schedule.epochs=24")
    assert "next: resume" in proc.stderr and "next: finished" in proc.stderr
    assert {"checkpoints/last.pt", "model_final.pth"} <= keys(client, "runs/rn50-24ep-ec2")
    assert "hf_canary_value" not in proc.stdout + proc.stderr


def test_spot_notice_checkpoints_uploads_and_exits_75(fake_bin, fake_venv, tmp_path, endpoint, client, imds):
    env = train_env(tmp_path, fake_venv, "spot", imds.url, BUCKET=BUCKET, AWS_ENDPOINT_URL=endpoint,
                    RUN_NAME="spot-run", **CREDENTIALS)
    run = tmp_path / "mnt" / "runs" / "spot-run"

    def arm_when_ready():  # the notice comes once the trainer is up, as on a real instance
        deadline = time.monotonic() + 30
        while not (run / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        imds.notice = NOTICE

    threading.Thread(target=arm_when_ready, daemon=True).start()
    proc, commands = bootstrap(fake_bin, tmp_path, "train", mounted=(str(tmp_path / "mnt"),), env=env)
    assert proc.returncode == 75, proc.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"saved on SIGUSR1"
    assert json.loads((run / "logs" / "spot-notice.json").read_text()) == NOTICE
    assert len([c for c in commands if c.startswith("torchrun ")]) == 1  # no local restart on a dying instance
    body = client.get_object(Bucket=BUCKET, Key="runs/spot-run/checkpoints/last.pt")["Body"].read()
    assert body == b"saved on SIGUSR1"  # uploaded before exiting


def test_divergence_is_not_restarted(fake_bin, fake_venv, tmp_path, imds):
    env = train_env(tmp_path, fake_venv, "diverge", imds.url)
    proc, commands = bootstrap(fake_bin, tmp_path, "train", mounted=(str(tmp_path / "mnt"),), env=env)
    assert proc.returncode == 1 and "next: stop" in proc.stderr
    assert len([c for c in commands if c.startswith("torchrun ")]) == 1


def test_data_step_pulls_cached_shards_from_s3(fake_bin, fake_venv, tmp_path, endpoint, client):
    for key, body in {"train/shard-000000.tar": b"tar", "manifest.json": b"{}"}.items():
        client.put_object(Bucket=BUCKET, Key=f"cache/shards/test-id/{key}", Body=body)
    (tmp_path / "mnt" / "shards" / ".complete").unlink()
    env = {"VENV": str(fake_venv), "BUCKET": f"s3://{BUCKET}/cache", "SHARD_ID": "test-id",
           "AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    proc, _ = bootstrap(fake_bin, tmp_path, "data", mounted=(str(tmp_path / "mnt"),), env=env)
    assert proc.returncode == 0, proc.stderr
    shards = tmp_path / "mnt" / "shards"
    assert (shards / "train" / "shard-000000.tar").read_bytes() == b"tar" and (shards / ".complete").exists()


def test_data_step_without_cache_or_token_says_what_to_do(fake_bin, fake_venv, tmp_path, endpoint):
    (tmp_path / "mnt" / "shards" / ".complete").unlink()
    env = {"VENV": str(fake_venv), "BUCKET": BUCKET, "SHARD_ID": "absent", "AWS_ENDPOINT_URL": endpoint,
           **CREDENTIALS}
    proc, _ = bootstrap(fake_bin, tmp_path, "data", mounted=(str(tmp_path / "mnt"),), env=env)
    assert proc.returncode == 1 and "HF_TOKEN is not set" in proc.stderr and "--secret HF_TOKEN" in proc.stderr


FAKE_TORCH = """__version__ = "2.99.0+cu999"


class version:
    cuda = "99.9"


class cuda:
    @staticmethod
    def is_available():
        return {available}
"""


def check_cuda(fake_bin: Path, venv: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    (fake_bin / "nvidia-smi").write_text('#!/usr/bin/env bash\n[[ $1 == -L ]] && echo "GPU 0: NVIDIA L40S" '
                                         '|| echo 535.183.01\n')
    return subprocess.run(["bash", "-c", 'source "$1" && check_cuda', "bash", str(BOOTSTRAP)], capture_output=True,
                          text=True, env={"PATH": f"{fake_bin}:{os.environ['PATH']}", "VENV": str(venv),
                                          "HOME": str(tmp_path), **env}, timeout=120)


@pytest.mark.parametrize("available", [False, True])
def test_setup_checks_that_torch_can_use_the_driver(fake_bin, fake_venv, tmp_path, available):
    """A torch (a stand-in module, whatever this machine has) that sees no GPU, like a CUDA build newer than the
    instance's driver, stops the set-up with the fix; one that sees it passes."""
    fake = tmp_path / "fake-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_TORCH.format(available=available))
    proc = check_cuda(fake_bin, fake_venv, tmp_path, PYTHONPATH=str(fake.parent))
    if available:
        assert proc.returncode == 0, proc.stderr
        assert "CUDA ok: driver 535.183.01, 1 GPU(s)" in proc.stderr
    else:
        assert proc.returncode == 1
        assert "torch 2.99.0+cu999 for CUDA 99.9 cannot use NVIDIA driver 535.183.01" in proc.stderr
        assert "TORCH_SPEC=" in proc.stderr


def test_setup_stops_when_torch_cannot_use_the_driver(fake_bin, fake_venv, tmp_path):
    """The venv's real torch with every GPU hidden (CUDA_VISIBLE_DEVICES=""): the same stop on any machine,
    with or without a GPU."""
    proc = check_cuda(fake_bin, fake_venv, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 1
    assert "cannot use NVIDIA driver 535.183.01" in proc.stderr and "TORCH_SPEC=" in proc.stderr


NVIDIA_SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+"""


@pytest.mark.parametrize("cuda,extra", [("13.0", "dali-cu13"), ("12.8", "dali-cu12"), (None, "dali-cu12")])
def test_the_dali_build_follows_the_drivers_cuda(fake_bin, tmp_path, cuda, extra):
    """setup installs the project with the DALI extra of the driver's CUDA major (nvidia-smi's header); no GPU
    (no nvidia-smi): the CUDA 12 build, which also runs DALI's CPU operators."""
    path = os.environ["PATH"]
    if cuda is None:
        (fake_bin / "nvidia-smi").unlink()
        path = ":".join(p for p in path.split(":") if not (Path(p) / "nvidia-smi").exists())
    else:
        (fake_bin / "nvidia-smi").write_text("#!/usr/bin/env bash\ncat <<'EOF'\n"
                                             + NVIDIA_SMI_HEADER.format(cuda=cuda) + "\nEOF\n")
    proc = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1"; m=$(driver_cuda_major); '
                                         'echo "$m $(dali_extra "$m")"', "bash", str(BOOTSTRAP)],
                          capture_output=True, text=True, env={"PATH": f"{fake_bin}:{path}", "HOME": str(tmp_path)},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = [cuda.split(".")[0], extra] if cuda else [extra]
    assert proc.stdout.split() == expected
