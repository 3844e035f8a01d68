#!/usr/bin/env bash
# ResNet-50 on ImageNet-1k on one EC2 GPU instance (Deep Learning AMI or a SkyPilot node), spot-safe.
#
#   export BUCKET=my-bucket            # S3 bucket (or s3://bucket/prefix) for checkpoints and the shard cache
#   read -rs HF_TOKEN && export HF_TOKEN   # only needed while the shards are not yet cached in S3
#   bash deploy/aws/bootstrap.sh all   # = setup + train; every step is idempotent, re-run it after anything
#
# Steps (each also runs alone: bash deploy/aws/bootstrap.sh STEP):
#   nvme      mount the local NVMe instance store (RAID-0 if several) at $NVME_MOUNT; prints the data root
#   env       python venv at $VENV with torch and this project (pip install -e '.[aws,dali-cu12|13]')
#   data      shards at DATA_ROOT/shards: from the S3 cache, else HF download + preprocess.shard + upload
#   setup     nvme + env + data  (SkyPilot's `setup:`)
#   train     torchrun -m train.main with S3 mirroring of the run folder, the spot watcher, and restarts
#             while the trainer makes progress; exits 75 after a spot notice (SkyPilot's `run:`)
#   install-service   systemd unit that re-runs `all` at boot (a stopped-and-restarted spot instance resumes)
# Knobs (environment): BUCKET, PRESET=rn50, EPOCHS=24, TARGET=ec2, RUN_NAME=$PRESET-${EPOCHS}ep-$TARGET,
#   TRAIN_ARGS (extra --section.key=value overrides), NVME_MOUNT=/mnt/nvme, FALLBACK_DIR=~/rn50-data,
#   VENV=~/rn50-venv, TORCH_SPEC="torch torchvision", SHARD_ID, GPUS, MAX_FAILURES=2, SYNC_INTERVAL=30 (s),
#   SPOT_POLL=5 (s), SHARD_WAIT_MIN=360, RESTART_DELAY=10 (s), IMDS_URL.
#   HF_TOKEN is read from the environment only: never logged, never written to disk.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/../.." && pwd)
PRESET=${PRESET:-rn50}
EPOCHS=${EPOCHS:-24}
TARGET=${TARGET:-ec2}
RUN_NAME=${RUN_NAME:-$PRESET-${EPOCHS}ep-$TARGET}
TRAIN_ARGS=${TRAIN_ARGS:-}
NVME_MOUNT=${NVME_MOUNT:-/mnt/nvme}
FALLBACK_DIR=${FALLBACK_DIR:-$HOME/rn50-data}
VENV=${VENV:-$HOME/rn50-venv}
TORCH_SPEC=${TORCH_SPEC:-torch torchvision}
SHARD_ID=${SHARD_ID:-imagenet-1k-500px-q90}  # preprocess.shard defaults: longer side <= 500 px, JPEG quality 90
MAX_FAILURES=${MAX_FAILURES:-2}              # consecutive attempts without progress before giving up
SYNC_INTERVAL=${SYNC_INTERVAL:-30}           # seconds between S3 uploads of the run folder
SPOT_POLL=${SPOT_POLL:-5}                    # seconds between spot notice polls (notice comes ~120 s early)
SHARD_WAIT_MIN=${SHARD_WAIT_MIN:-360}        # minutes other nodes wait for node 0 to cache the shards
RESTART_DELAY=${RESTART_DELAY:-10}           # seconds between a failed attempt and the next
IMDS_URL=${IMDS_URL:-http://169.254.169.254} # instance metadata service (spot_watcher.py reads it too)
HF_PARQUET_GB=160                            # ILSVRC/imagenet-1k train + validation parquet, with margin

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------------------------------------------------
# Local NVMe

# Value of KEY in one line of `lsblk -P` output (KEY="value" pairs; lsblk may hex-escape spaces).
lsblk_field() {
  local re="(^|[[:space:]])$1=\"([^\"]*)\""
  if [[ $2 =~ $re ]]; then
    local value=${BASH_REMATCH[2]//\\x20/ }
    printf '%s' "${value%"${value##*[![:space:]]}"}"
  fi
}

# Reads `lsblk -P -o NAME,MODEL,TYPE,MOUNTPOINT,PKNAME` on stdin and prints what to do with the instance store:
#   mounted PATH        a store (or an array/partition built on one) is already mounted: use it as it is
#   array /dev/mdN      an array of stores exists but is not mounted (after a reboot): mount it, keep the data
#   single /dev/X       one free store: format and mount it
#   raid0 /dev/X ...    several free stores: RAID-0 them, format, mount
#   none                no instance store (or all in other use): use a directory on the root volume
# EBS volumes ("Amazon Elastic Block Store"), the root disk among them, are never touched.
nvme_plan() {
  local line name pk mnt
  local -a rows=() stores=() free=()
  local -A is_store=() has_child=()
  while IFS= read -r line; do
    [[ -n $line ]] && rows+=("$line")
  done
  for line in "${rows[@]}"; do
    if [[ $(lsblk_field TYPE "$line") == disk && $(lsblk_field MODEL "$line") == *"Instance Storage"* ]]; then
      name=$(lsblk_field NAME "$line")
      stores+=("$name")
      is_store[$name]=1
    fi
  done
  if (( ${#stores[@]} == 0 )); then echo none; return; fi
  for line in "${rows[@]}"; do
    name=$(lsblk_field NAME "$line"); pk=$(lsblk_field PKNAME "$line"); mnt=$(lsblk_field MOUNTPOINT "$line")
    [[ -n $pk ]] && has_child[$pk]=1
    if [[ -n $mnt && ( -n ${is_store[$name]:-} || -n ${is_store[$pk]:-} ) ]]; then echo "mounted $mnt"; return; fi
  done
  for line in "${rows[@]}"; do
    pk=$(lsblk_field PKNAME "$line")
    if [[ $(lsblk_field TYPE "$line") == raid* && -n ${is_store[$pk]:-} ]]; then
      echo "array /dev/$(lsblk_field NAME "$line")"; return
    fi
  done
  for name in "${stores[@]}"; do
    [[ -z ${has_child[$name]:-} ]] && free+=("/dev/$name")
  done
  case ${#free[@]} in
    0) echo none ;;
    1) echo "single ${free[0]}" ;;
    *) echo "raid0 ${free[*]}" ;;
  esac
}

format_and_mount() {  # DEVICE MOUNTPOINT
  as_root mkfs.ext4 -q -F -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$1" >&2
  as_root mkdir -p "$2"
  as_root mount -o noatime "$1" "$2" >&2
  as_root chown "$(id -u):$(id -g)" "$2"
}

# Mounts the instance store at MOUNTPOINT if needed; prints the folder to keep data in. Idempotent.
nvme_setup() {
  local mount=$1 plan kind
  local -a devs
  if mountpoint -q "$mount"; then log "$mount is already mounted"; echo "$mount"; return; fi
  plan=$(lsblk -P -o NAME,MODEL,TYPE,MOUNTPOINT,PKNAME | nvme_plan)
  read -r kind plan <<< "$plan"
  read -ra devs <<< "${plan:-}"
  case $kind in
    mounted)
      log "instance store already mounted at ${devs[0]}; using it"
      echo "${devs[0]}" ;;
    array)
      log "mounting existing array ${devs[0]} at $mount"
      as_root mkdir -p "$mount"
      as_root mount -o noatime "${devs[0]}" "$mount" >&2
      echo "$mount" ;;
    single)
      log "formatting instance store ${devs[0]} and mounting it at $mount"
      format_and_mount "${devs[0]}" "$mount"
      echo "$mount" ;;
    raid0)
      log "RAID-0 over ${#devs[@]} instance stores (${devs[*]}) at $mount"
      command -v mdadm > /dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mdadm >&2
      as_root mdadm --create /dev/md0 --run --level=0 --raid-devices="${#devs[@]}" "${devs[@]}" >&2
      format_and_mount /dev/md0 "$mount"
      echo "$mount" ;;
    *)
      log "warning: no free NVMe instance store; using $FALLBACK_DIR on the root volume (slower, size-limited)"
      mkdir -p "$FALLBACK_DIR"
      echo "$FALLBACK_DIR" ;;
  esac
}

data_root() { nvme_setup "$NVME_MOUNT"; }

# ---------------------------------------------------------------------------------------------------------
# Python environment

env_setup() {
  local stamp="$VENV/.rn50-installed" want
  want=$(cat "$REPO_DIR/setup.cfg" "$REPO_DIR/pyproject.toml" | sha256sum | cut -c1-16)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then log "python env $VENV is up to date"; return; fi
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV" || {
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
      python3 -m venv "$VENV"
    }
  fi
  local -a torch_spec
  read -ra torch_spec <<< "$TORCH_SPEC"
  log "installing ${torch_spec[*]} and the project into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "${torch_spec[@]}"
  local major dali
  major=$(driver_cuda_major)
  dali=${DALI_EXTRA:-$(dali_extra "$major")}
  log "NVIDIA DALI: the $dali build (driver's CUDA: ${major:-no GPU}; DALI_EXTRA=dali-cu12|dali-cu13 overrides)"
  "$VENV/bin/pip" install -q -e "${REPO_DIR}[aws,$dali]"
  "$VENV/bin/python" -c 'import boto3' 2> /dev/null || "$VENV/bin/pip" install -q boto3
  check_cuda
  echo "$want" > "$stamp"
}

# The driver's CUDA major from nvidia-smi's header ("CUDA Version: 13.0"); empty without a GPU.
driver_cuda_major() {
  { nvidia-smi 2> /dev/null || true; } | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1
}

# The DALI extra for a CUDA major: dali-cu13 from 13 on, else (12, or no GPU) dali-cu12.
dali_extra() {
  if [[ -n ${1:-} ]] && (( $1 >= 13 )); then echo dali-cu13; else echo dali-cu12; fi
}

# Fails in setup (minutes, cheap) rather than in run when the torch wheel's CUDA is newer than the driver.
check_cuda() {
  command -v nvidia-smi > /dev/null || return 0
  local driver torch_info
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
  torch_info=$("$VENV/bin/python" -c 'import torch; print(torch.__version__, "for CUDA", torch.version.cuda)
raise SystemExit(0 if torch.cuda.is_available() else 1)') ||
    die "torch $torch_info cannot use NVIDIA driver $driver; pick a build for it, e.g. \
TORCH_SPEC='torch torchvision --index-url https://download.pytorch.org/whl/cu126'"
  log "CUDA ok: driver $driver, $(nvidia-smi -L | grep -c '^GPU') GPU(s)"
}

# ---------------------------------------------------------------------------------------------------------
# S3

s3_base() { local b=${BUCKET:-}; [[ -z $b || $b == s3://* ]] || b="s3://$b"; echo "${b%/}"; }
s3_enabled() { [[ -n ${BUCKET:-} ]]; }
s3() { "$VENV/bin/python" "$HERE/s3sync.py" "$@"; }

# 0 if the object exists, 1 if not; a broken bucket or credentials stop the script instead of reading as "no".
s3_has() {
  local rc=0
  s3 exists "$1" || rc=$?
  (( rc <= 1 )) || die "cannot read $1 (see the s3sync message above)"
  return "$rc"
}

# The instance's region from IMDSv2 (empty off EC2), so boto3 talks to the bucket's regional endpoint.
instance_region() {
  local token
  token=$(curl -sf -m 2 -X PUT "$IMDS_URL/latest/api/token" \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2> /dev/null) || return 0
  curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$IMDS_URL/latest/meta-data/placement/region" 2> /dev/null || true
}

init_aws() {
  local region
  if [[ -z ${AWS_DEFAULT_REGION:-} ]]; then
    region=$(instance_region)
    if [[ -n $region ]]; then export AWS_DEFAULT_REGION=$region; fi
  fi
  if s3_enabled; then
    s3 ensure-bucket "$(s3_base)" ${AWS_DEFAULT_REGION:+--region "$AWS_DEFAULT_REGION"}
  else
    log "warning: BUCKET is not set: no S3 copy of checkpoints, so a lost instance loses the run"
  fi
}

node_rank() { echo "${SKYPILOT_SETUP_NODE_RANK:-${SKYPILOT_NODE_RANK:-0}}"; }

# ---------------------------------------------------------------------------------------------------------
# Data

# Where the HF parquet goes: the NVMe if it has room for parquet and shards, else the (EBS) home folder.
hf_dir_for() {
  local avail_gb
  avail_gb=$(df -P -BG "$1" | awk 'NR == 2 { print $4 + 0 }')
  if (( avail_gb >= 2 * HF_PARQUET_GB + 100 )); then echo "$1/hf/imagenet-1k"; else echo "$HOME/hf/imagenet-1k"; fi
}

data_setup() {
  local root=$1 shards="$1/shards" url hf_dir waited=0
  url="$(s3_base)/shards/$SHARD_ID"
  if [[ -f $shards/.complete ]]; then log "shards ready in $shards"; return; fi
  if (( $(node_rank) > 0 )) && s3_enabled && ! s3_has "$url/manifest.json"; then
    log "waiting for node 0 to cache the shards at $url"
    until s3_has "$url/manifest.json"; do
      (( waited++ < SHARD_WAIT_MIN )) || die "no shards at $url after $SHARD_WAIT_MIN min"
      sleep 60
    done
  fi
  if s3_enabled && s3_has "$url/manifest.json"; then
    log "downloading cached shards $url -> $shards"
    s3 pull "$url" "$shards" --include '**' --last manifest.json
  else
    [[ -n ${HF_TOKEN:-} ]] || die "HF_TOKEN is not set and $url holds no shards: accept the terms at \
https://huggingface.co/datasets/ILSVRC/imagenet-1k, then export HF_TOKEN (SkyPilot: --secret HF_TOKEN)"
    hf_dir=$(hf_dir_for "$root")
    log "downloading ILSVRC/imagenet-1k train + validation parquet (~155 GB) to $hf_dir (HF_TOKEN set, not shown)"
    HF_XET_HIGH_PERFORMANCE=1 "$VENV/bin/python" - "$hf_dir" << 'PY'
import sys
from huggingface_hub import snapshot_download  # reads HF_TOKEN from the environment

snapshot_download("ILSVRC/imagenet-1k", repo_type="dataset", local_dir=sys.argv[1],
                  allow_patterns=["data/train-*", "data/validation-*", "*.md", "*.py"])
PY
    (cd "$REPO_DIR" && "$VENV/bin/python" -m preprocess.shard --src "$hf_dir" --out "$shards" --no-progress)
    if s3_enabled; then
      log "caching the shards at $url (so a replacement instance skips download and sharding)"
      s3 push "$shards" "$url" --include '**' --last manifest.json
    fi
  fi
  touch "$shards/.complete"
}

# ---------------------------------------------------------------------------------------------------------
# Training

gpu_count() {
  if [[ -n ${GPUS:-} ]]; then echo "$GPUS"
  elif [[ -n ${SKYPILOT_NUM_GPUS_PER_NODE:-} ]]; then echo "$SKYPILOT_NUM_GPUS_PER_NODE"
  elif command -v nvidia-smi > /dev/null; then nvidia-smi -L | grep -c '^GPU'
  else echo 1
  fi
}

# torchrun's arguments, one per line: SkyPilot's node list for several nodes, else one standalone node.
torchrun_args() {
  if (( ${SKYPILOT_NUM_NODES:-1} > 1 )); then
    [[ -n ${SKYPILOT_NODE_IPS:-} && -n ${SKYPILOT_NODE_RANK:-} ]] || die "SKYPILOT_NUM_NODES > 1 without SKYPILOT_NODE_IPS/NODE_RANK"
    printf '%s\n' "--nnodes=$SKYPILOT_NUM_NODES" "--node_rank=$SKYPILOT_NODE_RANK" \
      "--nproc_per_node=$(gpu_count)" "--master_addr=$(head -n 1 <<< "$SKYPILOT_NODE_IPS")" \
      "--master_port=${MASTER_PORT:-29500}"
  else
    printf '%s\n' --standalone "--nproc_per_node=$(gpu_count)"
  fi
}

# Worker exit codes from torchrun's failure summary ("exitcode  : 75 (pid: ...)"): torchrun itself exits 1.
worker_exit_codes() { grep -oE 'exitcode *: *-?[0-9]+' "$1" 2> /dev/null | grep -oE -- '-?[0-9]+$' | sort -u || true; }

# What to do after one attempt: RC NOTICE(0/1) PROGRESS(0/1) [WORKER_CODES...] -> finished|spot|stop|resume|retry
next_action() {
  local rc=$1 notice=$2 progress=$3 code
  shift 3
  if (( rc == 0 )); then echo finished; return; fi
  if (( notice )); then echo spot; return; fi
  for code in "$rc" "$@"; do
    # bad config/data/run folder, diverged, or a checkpoint that could not be written (disk full): a rerun repeats it
    if (( code == 2 || code == 3 || code == 4 )); then echo stop; return; fi
  done
  for code in "$rc" "$@"; do
    if (( code == 75 )); then echo resume; return; fi
  done
  if (( progress )); then echo resume; else echo retry; fi
}

# Identity of a file version: train.main replaces last.pt by rename, so a new save is a new inode.
version() { stat -c '%i %Y' "$1" 2> /dev/null || echo none; }

SYNC_PID="" TRAIN_PID=""
stop_sync() {  # the mirror pushes once more on SIGTERM, then exits
  if [[ -n $SYNC_PID ]]; then kill -TERM "$SYNC_PID" 2> /dev/null || true; wait "$SYNC_PID" 2> /dev/null || true; SYNC_PID=""; fi
}

on_stop() {  # SIGTERM/SIGINT to this script (sky jobs cancel, systemctl stop): trainer checkpoints, upload, exit
  log "stopping: the trainer saves last.pt, then a last upload"
  if [[ -n $TRAIN_PID ]]; then kill -TERM "$TRAIN_PID" 2> /dev/null || true; wait "$TRAIN_PID" 2> /dev/null || true; fi
  stop_sync
  exit 143
}

train_run() {
  local root run_dir url notice attempt=0 failures=0 rc before action watcher_pid tail_pid log_file targs_text rank
  local -a targs extra codes
  root=$(data_root)
  run_dir="$root/runs/$RUN_NAME"
  url="$(s3_base)/runs/$RUN_NAME"
  notice="$run_dir/logs/spot-notice.json"
  mkdir -p "$run_dir/logs"
  [[ -f $root/shards/.complete ]] || die "no shards in $root/shards: run \`bash $0 setup\` first"
  rank=$(node_rank)
  targs_text=$(torchrun_args)
  mapfile -t targs <<< "$targs_text"
  if s3_enabled; then s3 pull "$url" "$run_dir"; fi
  if s3_enabled && (( rank == 0 )); then
    # not through s3(): a backgrounded function is a subshell, and SIGTERM would stop it, not the mirror
    "$VENV/bin/python" "$HERE/s3sync.py" watch "$run_dir" "$url" --interval "$SYNC_INTERVAL" &
    SYNC_PID=$!
  fi
  trap on_stop TERM INT
  read -ra extra <<< "$TRAIN_ARGS"
  cd "$REPO_DIR"
  while [[ ! -f $run_dir/model_final.pth ]]; do
    attempt=$((attempt + 1))
    rm -f "$notice"
    before=$(version "$run_dir/checkpoints/last.pt")
    log "attempt $attempt: torchrun ${targs[*]} -m train.main --data $root/shards --out $run_dir --config $PRESET --schedule.epochs=$EPOCHS ${extra[*]}"
    log_file="$run_dir/logs/attempt-$attempt.log"
    # Output to a file, shown by a tail that is our child: a `> >(tee)` would be torchrun's child, and the
    # spot watcher signals torchrun's children.
    "$VENV/bin/torchrun" "${targs[@]}" -m train.main --data "$root/shards" --out "$run_dir" --config "$PRESET" \
      "--schedule.epochs=$EPOCHS" "${extra[@]}" > "$log_file" 2>&1 &
    TRAIN_PID=$!
    tail -n +1 -f --pid="$TRAIN_PID" "$log_file" &
    tail_pid=$!
    "$VENV/bin/python" "$HERE/spot_watcher.py" --children "$TRAIN_PID" --interval "$SPOT_POLL" \
      --base-url "$IMDS_URL" --notice-file "$notice" &
    watcher_pid=$!
    rc=0
    wait "$TRAIN_PID" || rc=$?
    TRAIN_PID=""
    kill "$watcher_pid" 2> /dev/null || true
    wait "$watcher_pid" "$tail_pid" 2> /dev/null || true
    if s3_enabled && (( rank == 0 )); then s3 push "$run_dir" "$url" || log "warning: upload failed; the mirror retries"; fi
    mapfile -t codes < <(worker_exit_codes "$log_file")
    action=$(next_action "$rc" "$([[ -f $notice ]] && echo 1 || echo 0)" \
      "$([[ $(version "$run_dir/checkpoints/last.pt") != "$before" ]] && echo 1 || echo 0)" "${codes[@]}")
    log "attempt $attempt ended: torchrun exit $rc, worker exit codes: ${codes[*]:-none}; next: $action"
    case $action in
      finished) ;;
      spot) stop_sync; log "spot interruption: last.pt is saved and uploaded; exit 75 so the scheduler resumes"; exit 75 ;;
      stop) stop_sync; die "the trainer failed in a way a restart repeats; see $log_file" ;;
      resume) failures=0 ;;
      retry)
        failures=$((failures + 1))
        (( failures <= MAX_FAILURES )) || { stop_sync; die "$failures attempts in a row without progress; see $run_dir/logs"; } ;;
    esac
    [[ $action == finished ]] || sleep "$RESTART_DELAY"
  done
  if (( rank == 0 )) && [[ ! -f $run_dir/gradcam.png && -f $run_dir/checkpoints/best.pt ]]; then
    "$VENV/bin/python" -m viz.gradcam --checkpoint "$run_dir/checkpoints/best.pt" --data "$root/shards" \
      --output "$run_dir/gradcam.png" || log "warning: Grad-CAM failed; the model is fine (see above)"
  fi
  stop_sync
  log "done: $run_dir/model_final.pth${BUCKET:+ (and $url/model_final.pth)}"
}

# ---------------------------------------------------------------------------------------------------------
# systemd (plain EC2 spot with interruption behaviour "stop": the restarted instance picks the run up again)

service_unit() {
  local v
  for v in "${BUCKET:-}" "$TRAIN_ARGS"; do [[ $v != *'"'* ]] || die "values with double quotes cannot go in a unit file"; done
  cat << EOF
[Unit]
Description=imagenet-rn50 training ($RUN_NAME); resumes from S3 after a restart
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$(id -un)
Environment="BUCKET=${BUCKET:-}" "PRESET=$PRESET" "EPOCHS=$EPOCHS" "TARGET=$TARGET" "RUN_NAME=$RUN_NAME"
Environment="TRAIN_ARGS=$TRAIN_ARGS" "NVME_MOUNT=$NVME_MOUNT" "VENV=$VENV" "HOME=$HOME"
ExecStart=/bin/bash $HERE/bootstrap.sh all
Restart=on-failure
RestartSec=60
RestartPreventExitStatus=1

[Install]
WantedBy=multi-user.target
EOF
}

install_service() {
  s3_enabled || die "BUCKET must be set: after a restart the shards and checkpoints come back from S3"
  service_unit | as_root tee /etc/systemd/system/rn50-train.service > /dev/null
  as_root systemctl daemon-reload
  as_root systemctl enable rn50-train.service
  log "installed rn50-train.service (no HF token in it: it needs the shards cached in $(s3_base)/shards)."
  log "start now: sudo systemctl start rn50-train; follow: journalctl -fu rn50-train"
}

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

main() {
  local root
  case ${1:-all} in
    nvme) data_root ;;
    env) env_setup ;;
    data) root=$(data_root); init_aws; data_setup "$root" ;;
    setup) root=$(data_root); env_setup; init_aws; data_setup "$root" ;;
    train) init_aws; train_run ;;
    all) root=$(data_root); env_setup; init_aws; data_setup "$root"; train_run ;;
    torchrun-args) torchrun_args ;;
    next-action) shift; next_action "$@" ;;
    service-unit) service_unit ;;
    install-service) install_service ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
