"""Does DALI's fused decode-and-crop (decoders.image_random_crop) work on this device? Asked in a child process.

`train.data.TrainLoader(decode="auto")` calls `probe()` once per process before its first GPU pipeline.
The failure reported for nvImageCodec 0.9 (NVIDIA/nvImageCodec issue 55) is an internal error on A100 and a
segfault on H100 at the first batch; a segfault cannot be caught inside the trainer, so a child process
builds the fused pipeline on a few of the real shards and runs a few batches. Exit status 0: it works.
It costs one Python start with DALI imported (a few seconds), once per training process.

    python -m train.decode_probe '{"tars": [...], "idxs": [...], "device_id": 0, "res": 160, ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCHES = 3  # batches the child decodes: the reported failure comes at the first
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def probe(tars, idxs, *, device_id: int | None, res: int, batch_size: int, max_side: int | None,
          dtype: torch.dtype = torch.float16, timeout: float = 180.0) -> tuple[bool, str]:
    """(True, "") if a child process decoded BATCHES fused batches of the first two shards, else (False, why)."""
    spec = {"tars": [str(t) for t in tars[:2]], "idxs": [str(i) for i in idxs[:2]], "device_id": device_id,
            "res": res, "batch_size": batch_size, "max_side": max_side, "dtype": str(dtype).split(".")[-1]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        proc = subprocess.run([sys.executable, "-m", "train.decode_probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:.0f} s"
    if proc.returncode == 0:
        return True, ""
    lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "rror" in line or "failure" in line), lines[-1] if lines else "")
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    return False, f"{how}{': ' + reason.strip()[:300] if reason else ''}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    from train.pipelines import build_train_pipeline  # DALI is imported in the child only

    pipe = build_train_pipeline(spec["tars"], spec["idxs"], batch_size=spec["batch_size"], res=spec["res"],
                                device_id=spec["device_id"], num_threads=2, dtype=DTYPES[spec["dtype"]],
                                shuffle_buffer=0, decode="fused", max_side=spec["max_side"])
    for _ in range(BATCHES):
        images, _ = pipe.run()
        if tuple(images.as_tensor().shape()) != (spec["batch_size"], spec["res"], spec["res"], 3):
            print(f"decode_probe: error: unexpected batch shape {images.as_tensor().shape()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
