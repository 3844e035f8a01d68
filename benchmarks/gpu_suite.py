"""`python -m benchmarks.gpu_suite`: every GPU check and measurement in one command, for a bare GPU machine.

    python -m benchmarks.gpu_suite --out DIR [--profile quick|full] [--device cuda|cpu] [--export DIR2]
                                   [--deadline-s SECONDS] [--stages a,b,...]

Needs only torch, torchvision, numpy, pillow, pyarrow, pyyaml, tqdm and pytest, plus DALI and grad-cam
brought as one unpacked folder on PYTHONPATH (`../shared/tools/device-wheels pack`); no `datasets`: fixture
shards are made from generated JPEG folders through the ImageFolder source. Stages, each in its own process
with a time budget, each run even when an earlier one failed:

  env                  versions (torch, CUDA, GPU, DALI, nvImageCodec), the commit; never fails
  data                 photo-like 500 px JPEG shards for the loader benchmark; the real Imagenette shards
                       (`--real-shards`, or on a GPU the parts `benchmarks.carry_data` left in .carry/),
                       else toy shards from generated JPEG folders, labelled "toy" (also when a data part
                       is missing or damaged: the stages that read the photo shards are not affected)
  gpu-tests            pytest tests/test_data_gpu.py (skipped without CUDA)
  dali                 DALI images/s (fused and split decode) at 160 and 192 px with 4 and 6 CPU threads,
                       against the torchvision DataLoader with 6 workers (benchmarks.dataloader); the GPU
                       decoder's share of each batch (hw_decoder_load 0.65 and 0.99 besides the trainer's
                       0.9 on H200) at 192 px; the pipeline build over 1,281 shard indexes
  train-step           our step (bf16, channels_last, fed bf16) vs the reference (torchvision fp16 NCHW AMP
                       + GradScaler) at 160/192/224 px, batch 256, eager (benchmarks.train_step)
  train-main           `python -m train.main` for 2 epochs on the shards, SIGTERM as soon as epoch 2 starts
                       (a single process checks for it after every step: it stops after step 1 of epoch 2,
                       whatever the speed), then the same command again: it must resume and finish (exit 75,
                       then 0), with a metrics line per epoch, top-1 on each epoch the preset validates
                       (val.every_epochs and the last), run.json "finished" and model.safetensors written
  train-step-compiled  our step under torch.compile at 224 px first (the headline goal), then 160/192 px
  train-main-compiled  `python -m train.main --model.compile=true` for 2 epochs at one resolution (the preset's
                       first, 160 px: one graph, which the step stage may have left in the compile cache); must
                       finish (exit 0) with the same checks as train-main; its steady images/s set beside the
                       eager run's epoch 1 at the same resolution: the figure that decides the preset's default
  viz-eval             (full profile) viz's evaluation pass + 20 Grad-CAM rows on 5,000 photo-like val images
                       (benchmarks.viz_eval; issue 11's goal: 50,000 images + 20 rows in under a minute)
  proxy                (full profile) `python -m benchmarks.proxy` on the real Imagenette shards, if present:
                       5 and 20 epochs with the preset, then 5 epochs at twice its learning rate (cuda)

Everything is written under --out: results.json (all figures), summary.md (the one-screen summary also
printed at the end), BENCHMARKS.md (entries in docs/BENCHMARKS.md format, to copy there), logs/<stage>.log,
the stages' JSON rows and the training run. --export DIR copies summary.md, results.json, BENCHMARKS.md and
gpu-suite.tar.gz (logs, rows, metrics; no shards, images, checkpoints or weights) into DIR after every stage,
so a command cut at the device tool's time limit still brings back what ran. --deadline-s: the seconds this
command may still take; the stages are planned to end before it (each gets its budget, or a proportional share
of what is left, less ~15 s for the export; the last planned stage gets all that is left; a stage with under
5 s is skipped). The quick profile is budgeted
to 8 minutes on one H100/H200; --device cpu runs the same stages at toy sizes (about 3 minutes on 2 cores;
tests/test_gpu_suite.py runs it). Goals (never asserted, reported as met/missed): see goals() below and
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from preprocess.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
TRAIN_GFLOP_224 = 24.6  # forward + backward of ResNet-50 per 224 px image (as benchmarks.train_step)
EXIT_RESUME = 75  # train.main: stopped by a signal after saving, run again to resume
# left out of the exported archive: shards, images, checkpoints and weights (each file that comes back must be
# small), and anything else over ARCHIVE_FILE_LIMIT
BULKY = (".tar", ".idx", ".JPEG", ".jpg", ".pt", ".pth", ".safetensors", ".onnx", ".pt2")
ARCHIVE_FILE_LIMIT = 4 << 20  # bytes
EXPORT_RESERVE_S = 15.0  # kept back from the last stage for the summary and the export
MIN_STAGE_S = 5.0  # a stage with less time than this is skipped, not started
PIPELINE_READY = re.compile(r"^epoch (\d+): input pipeline ready in ([\d.]+) s(, built during)?", re.M)
STOPPED_AT = re.compile(r"^stopped by SIGTERM: .*\(epoch (\d+), step (\d+)\)", re.M)


@dataclass
class Sizes:
    """What the stages do on this device and profile."""
    deadline_s: float  # the whole suite, unless --deadline-s says otherwise
    budgets: dict  # stage -> seconds (the most it may take; a stage that ends early leaves time to later ones)
    photos: int  # photo-like JPEGs for the loader benchmark
    photo_side: int
    res: list  # resolutions of the loader benchmark
    dali_threads: list
    baseline_workers: int
    dali_seconds: float
    hw_decoder_loads: list  # the GPU decoder's shares of each batch tried besides the trainer's choice (0.9 on H200)
    build_shards: int  # shards (index files) the pipeline-build timing fabricates
    batch: int
    step_res: list  # eager step resolutions
    compiled_res: list  # compiled step resolutions, the headline one first (its row is written as measured)
    steps: int
    toy: dict  # toy shard sizes when no real shards
    train_args: list  # train.main overrides
    step_args: list  # train_step extras (both stages)
    compile_args: list  # train_step --compile extras
    compiled_train_res: int  # the one resolution of the compiled train.main run


def compiled_train_args(sizes: Sizes) -> list:
    """train.main overrides of the compiled run: the eager run's, compiled, at one resolution (one graph)."""
    fixed = ("--schedule.res_min", "--schedule.res_max", "--model.compile")
    r = sizes.compiled_train_res
    return ([a for a in sizes.train_args if not a.startswith(fixed)]
            + [f"--schedule.res_min={r}", f"--schedule.res_max={r}", "--model.compile=true"])


def sizes_for(device: str, profile: str) -> Sizes:
    full = profile == "full"
    if device == "cuda":
        # quick: 500 s of stages, what the third device call has left after unpacking the wheels
        # (600 s per command); not yet checked on a GPU
        budgets = {"data": 35, "gpu-tests": 60, "dali": 100, "train-step": 35, "train-main": 100,
                   "train-step-compiled": 110, "train-main-compiled": 60, "proxy": 0}
        if full:
            budgets = {"data": 60, "gpu-tests": 120, "dali": 200, "train-step": 90, "train-main": 300,
                       "train-step-compiled": 400, "train-main-compiled": 300, "viz-eval": 120, "proxy": 3600}
        return Sizes(deadline_s=500 if not full else 5400, budgets=budgets, photos=256 if not full else 1024,
                     photo_side=500, res=[160, 192] + ([224] if full else []), dali_threads=[4, 6] + ([8] if full else []),
                     baseline_workers=6, dali_seconds=5 if not full else 15, hw_decoder_loads=[0.65, 0.99],
                     build_shards=1281, batch=256, step_res=[160, 192, 224],
                     compiled_res=[224, 160, 192], steps=15 if not full else 40,
                     toy={"classes": 10, "per_class": 100, "val_per_class": 20, "size": 160},
                     train_args=["--config", "rn50", "--data.batch_size=256", "--val.batch_size=256"],
                     step_args=["--batch-size", "256"], compile_args=["--warmup", "5"], compiled_train_res=160)
    # CPU dry run: the same stages and code paths at toy sizes (its figures mean nothing), ~3 minutes on 2 cores.
    budgets = {"data": 120, "gpu-tests": 120, "dali": 120, "train-step": 120, "train-main": 240,
               "train-step-compiled": 240, "train-main-compiled": 240, "viz-eval": 180, "proxy": 600}
    return Sizes(deadline_s=1200 if not full else 3600, budgets=budgets, photos=32, photo_side=500, res=[64, 96],
                 dali_threads=[2], baseline_workers=2, dali_seconds=1, hw_decoder_loads=[], build_shards=64, batch=16,
                 step_res=[64], compiled_res=[64],
                 steps=2, toy={"classes": 10, "per_class": 10, "val_per_class": 4, "size": 64},
                 train_args=["--config", "smoke", "--model.arch=resnet18", "--data.batch_size=16",
                             "--data.num_threads=1", "--val.batch_size=35", "--schedule.res_min=32",
                             "--schedule.res_max=64", "--val.res=64", "--run.device=cpu"],
                 step_args=["--batch-size", "4", "--arch", "resnet18"], compile_args=["--warmup", "1"],
                 compiled_train_res=64)


@dataclass
class StageResult:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    detail: str = ""
    log: str = ""
    figures: dict = field(default_factory=dict)


class Suite:
    def __init__(self, out: Path, device: str, profile: str, real_shards: Path | None, carry: Path,
                 commit: str | None, python: str = sys.executable, export_dir: Path | None = None,
                 deadline_s: float | None = None):
        self.out, self.device, self.profile = out, device, profile
        self.sizes = sizes_for(device, profile)
        if deadline_s is not None:
            self.sizes.deadline_s = deadline_s
        self.real_shards, self.carry, self.commit, self.python = real_shards, carry, commit, python
        self.export_dir = export_dir  # refreshed after every stage: a run killed midway still leaves its results
        self.work = out / "work"
        self.logs = out / "logs"
        self.results: list[StageResult] = []
        self.pending: list[str] = []  # the stages still to run (run() plans them), this one included
        self.env_info: dict = {}
        self.data: dict = {}
        self.started = time.monotonic()
        for folder in (self.work, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    # -- running ---------------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.sizes.deadline_s - (time.monotonic() - self.started)

    def budget(self, name: str) -> float:
        """The stage's own budget, or its share of the time left before the deadline (less the export's
        reserve) in proportion to the budgets of the stages still to run, whichever is smaller. The last
        planned stage gets all the time left: what earlier stages saved goes to it (the compiled trainer's
        compile time is the least known figure of the quick profile)."""
        left = self.remaining() - (EXPORT_RESERVE_S if self.export_dir is not None else 0.0)
        if self.pending == [name]:
            return max(0.0, left)
        own = self.sizes.budgets.get(name, 60)
        planned = sum(self.sizes.budgets.get(n, 60) for n in (self.pending or [name]))
        share = own * min(1.0, left / planned) if planned > 0 else 0.0
        return max(0.0, min(own, share, left))

    def env(self) -> dict:
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "BENCHMARKS_FILE": str(self.out / "BENCHMARKS.md"), "BENCHMARK_COMMIT": self.env_info.get("commit", "")}

    def run_commands(self, result: StageResult, commands: list[list[str]]) -> None:
        """Run commands one after another within the stage's budget, output appended to its log."""
        deadline = time.monotonic() + result.budget_s
        log = self.logs / f"{result.name}.log"
        result.log = str(log.relative_to(self.out))
        with open(log, "a") as f:
            for cmd in commands:
                left = deadline - time.monotonic()
                if left < 1:
                    result.status, result.detail = "timeout", f"budget of {result.budget_s:.0f} s spent before: {' '.join(cmd[2:5])}"
                    return
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    rc = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    result.status = "timeout"
                    result.detail = f"stopped at its budget of {result.budget_s:.0f} s: {' '.join(cmd[2:5])}"
                    return
                if rc != 0:
                    result.status, result.detail = "failed", f"exit status {rc}: {' '.join(cmd[2:5])}; {_last_error(log)}"
                    return
        result.status = "ok"

    def stage(self, name: str, body) -> StageResult:
        result = StageResult(name, budget_s=round(self.budget(name), 1))
        began = time.monotonic()
        if result.budget_s < MIN_STAGE_S:
            result.status = "skipped"
            result.detail = (f"{max(self.remaining(), 0):.0f} s left before the suite's deadline of "
                             f"{self.sizes.deadline_s:.0f} s")
        else:
            print(f"[gpu_suite] {name}: budget {result.budget_s:.0f} s", flush=True)
            try:
                body(result)
            except Exception as exc:  # a stage's own bug or missing input must not stop the others
                result.status, result.detail = "failed", f"{type(exc).__name__}: {exc}"
        result.seconds = round(time.monotonic() - began, 1)
        print(f"[gpu_suite] {name}: {result.status} in {result.seconds:.0f} s {result.detail}".rstrip(), flush=True)
        self.finish_stage(result)
        return result

    def finish_stage(self, result: StageResult) -> None:
        """Record a stage, and refresh the export: a command cut at the device tool's limit keeps every stage
        that ended before the cut (summary, results, logs)."""
        if result.name in self.pending:
            self.pending.remove(result.name)
        self.results.append(result)
        self.write_results()
        if self.export_dir is not None:
            (self.out / "summary.md").write_text(summary_text(self))
            try:
                export(self.out, self.export_dir)
            except OSError as exc:  # a full disk must not end the suite: the next stage tries again
                print(f"[gpu_suite] export to {self.export_dir} failed: {exc}", file=sys.stderr, flush=True)

    # -- stages ----------------------------------------------------------------------------------------

    def stage_env(self, result: StageResult) -> None:
        info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                "commit": self.commit or _git_commit(), "date_utc": _now()}
        for package in ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-nvimgcodec-cu13",
                        "nvidia-nvimgcodec-cu12", "webdataset", "grad-cam", "numpy", "pillow", "datasets"):
            try:
                info[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            info["bf16"] = torch.cuda.is_bf16_supported()
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)
                info["driver"] = smi.stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
        info["dali_importable"] = importlib.util.find_spec("nvidia.dali") is not None
        self.env_info = info
        result.figures = info
        result.status = "ok"
        if self.device == "cuda" and not info["cuda_available"]:
            result.status, result.detail = "failed", "--device cuda but torch sees no CUDA device"

    def stage_data(self, result: StageResult) -> None:
        """Photo-like shards (the loader benchmark) and training shards (real, else toy) are made separately:
        one failing does not take the other's stages down, and missing or damaged data parts fall back to toy
        shards."""
        s = self.sizes
        notes, errors = [], []
        try:
            from benchmarks.dataloader import write_synthetic_shards

            photos = self.work / "photo-shards"
            if not (photos / "manifest.json").is_file():
                write_synthetic_shards(photos, s.photos, max_side=s.photo_side)
            self.data["photos"] = photos
            notes.append(f"{s.photos} photo-like JPEGs <= {s.photo_side} px in {photos.name}")
        except Exception as exc:  # noqa: BLE001 - reported, the training shards are still made
            errors.append(f"photo-like shards: {type(exc).__name__}: {exc}")
        try:
            real = self.real_shards or self.unpack_carried(notes)
            if real is not None:
                from preprocess.manifest import load_manifest

                manifest = load_manifest(real)
                self.data.update(shards=real, shards_kind="real",
                                 shards_name=str(manifest.get("source", {}).get("path", real)))
                notes.append(f"real shards {real}: {manifest['splits']['train']['images']} train, "
                             f"{manifest['splits']['val']['images']} val images")
            else:
                from benchmarks.toydata import toy_shards

                toy = self.work / "toy-shards"
                toy_shards(toy, images_per_shard=100, workers=min(4, os.cpu_count() or 1), **s.toy)
                self.data.update(shards=toy, shards_kind="toy", shards_name="generated shapes (toy)")
                notes.append(f"TOY shards of generated shapes, {s.toy['classes']} classes x {s.toy['per_class']} "
                             "train images (real ones: --real-shards DIR, or the carry_data parts on a GPU)")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"training shards: {type(exc).__name__}: {exc}")
        result.figures = {k: str(v) for k, v in self.data.items()}
        result.status = "failed" if errors else "ok"
        result.detail = "; ".join(errors + notes)

    def unpack_carried(self, notes: list) -> Path | None:
        """The real shards from benchmarks.carry_data's parts under --carry (on a GPU), or None: none there,
        or a part missing or damaged (said in `notes`: the toy shards stand in)."""
        from benchmarks.carry_data import CarryError, existing_parts, unpack

        if not existing_parts(self.carry):
            return None
        if self.device == "cpu":
            notes.append(f"the real shards in {self.carry} are left alone on a CPU (a dry run trains on toy "
                         "shards; --real-shards DIR to use some)")
            return None
        real = self.work / "imagenette-shards"
        try:
            index = unpack(self.carry, real)
        except (CarryError, OSError, ValueError, tarfile.TarError) as exc:
            notes.append(f"DATA PARTS UNUSABLE, toy shards instead: {exc}")
            return None
        notes.append(f"real shards unpacked from {index['parts']} part(s) ({index['name']})")
        return real

    def stage_gpu_tests(self, result: StageResult) -> None:
        if importlib.util.find_spec("pytest") is None:  # the device image is not known to have it
            result.status = "failed"
            result.detail = ("pytest is not importable here: tests/test_data_gpu.py did not run (bring pytest, "
                             "iniconfig, pluggy and packaging with the wheels)")
            return
        xml = self.out / "gpu-tests.xml"
        self.run_commands(result, [[self.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                    "tests/test_data_gpu.py", f"--junitxml={xml}"]])
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            result.figures = counts
            if result.status == "ok" and counts["passed"] == 0:
                result.detail = f"all {counts['skipped']} tests skipped (no CUDA device)"

    def stage_dali(self, result: StageResult) -> None:
        s = self.sizes
        rows = self.out / "dali.jsonl"
        rows.unlink(missing_ok=True)
        device = "gpu" if self.device == "cuda" else "cpu"
        commands = []
        for threads in s.dali_threads:
            last = threads == s.baseline_workers
            cmd = [self.python, "-m", "benchmarks.dataloader", "--data", str(self.data["photos"]), "--device", device,
                   "--res", *map(str, s.res), "--threads", str(threads), "--seconds", str(s.dali_seconds),
                   "--batch-size", str(s.batch), "--warmup", "3", "--json", str(rows),
                   "--notes", f"gpu_suite {self.profile}"]
            if last:  # the split decode path, the torchvision baseline (workers = threads) and the pipeline
                # build over ImageNet's shard count, once
                cmd += ["--decode", "both", "--baseline", "--build-shards", str(s.build_shards)]
            commands.append(cmd)
        if s.hw_decoder_loads:  # the hardware decoder's share of each batch, besides the trainer's own choice
            commands.append([self.python, "-m", "benchmarks.dataloader", "--data", str(self.data["photos"]),
                             "--device", device, "--res", str(s.res[-1]), "--threads", str(s.baseline_workers),
                             "--seconds", str(s.dali_seconds), "--batch-size", str(s.batch), "--warmup", "3",
                             "--json", str(rows), "--notes", f"gpu_suite {self.profile}",
                             "--hw-decoder-load", *map(str, s.hw_decoder_loads)])
        self.run_commands(result, commands)
        result.figures = {"rows": _read_jsonl(rows)}

    def stage_train_step(self, result: StageResult, compiled: bool) -> None:
        s = self.sizes
        rows = self.out / ("train_step_compiled.jsonl" if compiled else "train_step.jsonl")
        rows.unlink(missing_ok=True)
        res = s.compiled_res if compiled else s.step_res
        cmd = [self.python, "-m", "benchmarks.train_step", "--device", self.device, "--res", *map(str, res),
               *s.step_args, "--steps", str(s.steps), "--json", str(rows)]
        cmd += (["--compile", "--only", "ours", *s.compile_args] if compiled else ["--warmup", "3" if self.device == "cuda" else "1"])
        self.run_commands(result, [cmd])
        result.figures = {"rows": _read_jsonl(rows)}

    def stage_train_main(self, result: StageResult) -> None:
        run_dir = self.out / "train-main" / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run folder is refused: start a new one
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "train.main", "--data", str(self.data["shards"]), "--out", str(run_dir),
               *self.sizes.train_args, "--schedule.epochs=2", "--run.tensorboard=false",
               "--checkpoint.every_minutes=0"]
        log = self.logs / "train-main.log"
        result.log = str(log.relative_to(self.out))
        deadline = time.monotonic() + result.budget_s
        figures = {"shards": self.data["shards_kind"], "command": " ".join(cmd[1:])}
        result.figures = figures
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}   # run 1: SIGTERM when epoch 2 starts, acted on after its first step\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            watchdog = threading.Timer(max(1.0, deadline - time.monotonic()), _kill_group, [proc])
            watchdog.start()  # ends a run that hangs without printing
            signalled = None
            try:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()
                    # Sent before epoch 2's first step, not after a delay: one process checks for the signal
                    # after every step, so it stops after step 1 of epoch 2 however fast the steps are.
                    if signalled is None and line.startswith("epoch 2/"):
                        proc.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
                rc1 = proc.wait()
            finally:
                watchdog.cancel()
            if time.monotonic() >= deadline - 0.5:
                result.status, result.detail = "timeout", f"run 1 passed the budget of {result.budget_s:.0f} s"
                return
            figures["run1_exit"] = rc1
            if signalled is not None:
                figures["sigterm_to_exit_s"] = round(time.monotonic() - signalled, 1)
            if rc1 != EXIT_RESUME:  # the same command on a finished or failed run folder is refused (exit 2)
                result.status = "failed"
                result.detail = (f"run 1 exit {rc1}, expected {EXIT_RESUME} (stopped by SIGTERM)"
                                 + (" - it never printed 'epoch 2/', the signal was not sent" if signalled is None
                                    else " - it finished although signalled" if rc1 == 0 else f"; {_last_error(log)}"))
                return
            f.write(f"$ {' '.join(cmd)}   # run 2: resume\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc2 = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                result.status, result.detail = "timeout", f"run 2 (resume) passed the budget of {result.budget_s:.0f} s"
                return
        figures["run2_exit"] = rc2
        text = log.read_text()
        figures.update(train_main_figures(text, run_dir))
        problems = train_main_problems(figures, rc2)
        result.status = "failed" if problems else "ok"
        stopped = figures.get("stopped_at") or {}
        result.detail = "; ".join(problems) or (
            f"SIGTERM -> exit 75 at epoch {stopped.get('epoch')} step {stopped.get('step')} of "
            f"{figures.get('steps_per_epoch')} -> resumed -> exit 0 on {self.data['shards_kind']} shards")

    def stage_train_main_compiled(self, result: StageResult) -> None:
        """One fresh compiled run to the end: the compiled trainer works (graph breaks, recompiles and the
        eager validation between epochs included) and how fast its steady steps go."""
        run_dir = self.out / "train-main-compiled" / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "train.main", "--data", str(self.data["shards"]), "--out", str(run_dir),
               *compiled_train_args(self.sizes), "--schedule.epochs=2", "--run.tensorboard=false",
               "--checkpoint.every_minutes=0"]
        self.run_commands(result, [cmd])
        figures = {"shards": self.data["shards_kind"], "command": " ".join(cmd[1:]), "run_exit": 0 if result.status == "ok" else None}
        figures.update(train_main_figures((self.out / result.log).read_text(errors="replace"), run_dir))
        result.figures = figures
        if result.status != "ok":
            return
        problems = run_problems(figures)
        result.status = "failed" if problems else "ok"
        rates = [e.get("images_per_s") for e in figures["epochs"]]
        result.detail = "; ".join(problems) or (
            f"compiled, {len(rates)} epochs at {self.sizes.compiled_train_res} px on {self.data['shards_kind']} shards: "
            f"{', '.join(map(str, rates))} img/s steady -> exit 0")

    def stage_proxy(self, result: StageResult) -> None:
        if importlib.util.find_spec("benchmarks.proxy") is None:
            result.status, result.detail = "skipped", "benchmarks/proxy.py is not in this checkout yet"
            return
        if self.data.get("shards_kind") != "real":
            result.status, result.detail = "skipped", "needs the real Imagenette shards (carry_data parts or --real-shards)"
            return
        base = [self.python, "-m", "benchmarks.proxy", "--shards", str(self.data["shards"]), "--device", self.device]
        commands = [[*base, "--out", str(self.out / "proxy")]]
        if self.device == "cuda":
            # The preset's lr_per_256 was chosen on the 3-epoch CPU protocol; this checks whether a 5-epoch
            # run on every photo prefers twice that.
            from benchmarks.proxy import PRESET
            from train import config

            lr = 2 * config.resolve(PRESET).optim.lr_per_256
            commands.append([*base, "--epochs", "5", f"--optim.lr_per_256={lr:g}", "--out", str(self.out / f"proxy-lr{lr:g}")])
        self.run_commands(result, commands)

    def stage_viz_eval(self, result: StageResult) -> None:
        """viz's evaluation pass and 20 Grad-CAM rows (issue 11's goal: ImageNet's 50,000 val images and 20
        rows in under a minute on one GPU, i.e. > ~850 images/s) on photo-like val shards."""
        args = (["--images", "5000", "--batch-size", "256", "--threads", "12", "--cams", "20"] if self.device == "cuda"
                else ["--images", "32", "--batch-size", "16", "--threads", "1", "--cams", "2", "--arch", "resnet18",
                      "--res", "64"])
        self.run_commands(result, [[self.python, "-m", "benchmarks.viz_eval", "--device", self.device, "--flip",
                                    *args, "--notes", "gpu_suite"]])

    def run(self, only: set | None = None) -> list[StageResult]:
        plan = [("env", self.stage_env), ("data", self.stage_data), ("gpu-tests", self.stage_gpu_tests),
                ("dali", self.stage_dali), ("train-step", lambda r: self.stage_train_step(r, compiled=False)),
                ("train-main", self.stage_train_main),
                ("train-step-compiled", lambda r: self.stage_train_step(r, compiled=True)),
                ("train-main-compiled", self.stage_train_main_compiled)]
        if self.profile == "full":
            plan += [("viz-eval", self.stage_viz_eval), ("proxy", self.stage_proxy)]
        plan = [(name, body) for name, body in plan if not only or name in only or name in ("env", "data")]
        self.pending = [name for name, _ in plan]
        for name, body in plan:
            need = STAGE_INPUTS.get(name)
            if need and need not in self.data:
                self.finish_stage(StageResult(name, "skipped", detail=f"the data stage made no {need} shards"))
                continue
            self.stage(name, body)
        return self.results

    # -- reporting -------------------------------------------------------------------------------------

    def figures(self) -> dict:
        return collect_figures({r.name: r for r in self.results}, self.env_info.get("gpu", ""))

    def write_results(self) -> None:
        doc = {"suite": {"profile": self.profile, "device": self.device, "out": str(self.out),
                         "deadline_s": self.sizes.deadline_s, "elapsed_s": round(time.monotonic() - self.started, 1),
                         "data": {k: str(v) for k, v in self.data.items()}},
               "environment": self.env_info, "stages": [vars(r) for r in self.results], "figures": self.figures()}
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.out / "results.json")


# ---------------------------------------------------------------------------------------------------
# train-main: what its log and run folder say, and what must hold (pure functions: tested on made-up runs).

def train_main_figures(log_text: str, run_dir: Path) -> dict:
    """Figures of the two train.main runs: metrics lines, the epochs the config validates, where the signal
    stopped run 1, the pipeline-ready lines, the run's final state and the model files it wrote."""
    import yaml

    figures: dict = {"epochs": _read_jsonl(run_dir / "metrics.jsonl"), "resumed": "resuming from" in log_text,
                     "pipeline_ready": [{"epoch": int(m.group(1)), "wait_s": float(m.group(2)),
                                         "ahead": bool(m.group(3))} for m in PIPELINE_READY.finditer(log_text)]}
    stopped = STOPPED_AT.search(log_text)
    figures["stopped_at"] = {"epoch": int(stopped.group(1)), "step": int(stopped.group(2))} if stopped else None
    steps = re.search(r"^epoch \d+/\d+: res \d+ px, (\d+) steps", log_text, re.M)
    figures["steps_per_epoch"] = int(steps.group(1)) if steps else None
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        cfg = yaml.safe_load(config_file.read_text())
        epochs, every = int(cfg["schedule"]["epochs"]), int(cfg["val"].get("every_epochs", 1))
        figures["config_epochs"] = epochs
        figures["validated_epochs"] = [e for e in range(1, epochs + 1) if e == epochs or e % every == 0]
    state = run_dir / "run.json"
    figures["run_state"] = json.loads(state.read_text()).get("state") if state.is_file() else None
    figures["model_files"] = sorted(n for n in ("model.safetensors", "config.json", "model_final.pth")
                                    if (run_dir / n).is_file())
    return figures


def train_main_problems(figures: dict, rc2: int) -> list[str]:
    """What is wrong with a SIGTERM-and-resume pair of train.main runs (empty: nothing)."""
    problems = []
    if rc2 != 0 or not figures["resumed"]:
        problems.append(f"run 2 exit {rc2}" + ("" if figures["resumed"] else ", did not resume"))
    stopped = figures.get("stopped_at")
    if stopped is None or stopped["epoch"] != 2:
        problems.append(f"run 1 did not say it stopped in epoch 2 (saw {stopped})")
    return problems + run_problems(figures)


def run_problems(figures: dict) -> list[str]:
    """What is wrong with the run folder of a train.main run that should have finished (empty: nothing)."""
    problems = []
    metrics, expected = figures["epochs"], figures.get("config_epochs")
    if expected is None:
        problems.append("no config.yaml in the run folder")
    elif [m.get("epoch") for m in metrics] != list(range(1, expected + 1)):
        problems.append(f"metrics.jsonl has epochs {[m.get('epoch') for m in metrics]}, expected 1..{expected}")
    else:
        unvalidated = [e for e in figures["validated_epochs"] if "top1" not in metrics[e - 1]]
        if unvalidated:
            problems.append(f"no top-1 in metrics.jsonl for epoch(s) {unvalidated}, which the config validates "
                            f"(val.every_epochs and the last)")
    if figures["run_state"] != "finished":
        problems.append(f"run.json says {figures['run_state']!r}, expected 'finished'")
    missing = {"model.safetensors", "config.json"} - set(figures["model_files"])
    if missing:
        problems.append(f"the finished run lacks {', '.join(sorted(missing))}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Figures and goals from the stages' rows (pure functions: tested on made-up rows).

def collect_figures(stages: dict, gpu_name: str) -> dict:
    dali_rows = stages["dali"].figures.get("rows", []) if "dali" in stages else []
    eager = stages["train-step"].figures.get("rows", []) if "train-step" in stages else []
    compiled = stages["train-step-compiled"].figures.get("rows", []) if "train-step-compiled" in stages else []
    out: dict = {"dali": {}, "baseline": {}, "build": {}, "step": {}, "ratios": {}, "train_main": {}}
    builds = [row for row in dali_rows if row["pipeline"].startswith("pipeline-build")]
    dali_rows = [row for row in dali_rows if row not in builds]
    for row in builds:
        out["build"][f"{row['pipeline'].split()[-1]} pipeline over {row['shards']} shards"] = {
            key: row[key] for key in ("build s", "first batch s", "other Python thread during build, % of its speed")}
    for row in dali_rows:
        if row["pipeline"].startswith("dali"):
            load = row.get("hw decoder load")
            out["dali"][f"{row['pipeline']} {row['res']} px {row['threads']} thr"
                        + (f" hw_decoder_load {load:g}" if isinstance(load, (int, float)) else "")] = row["images/s"]
        else:
            out["baseline"][f"{row['res']} px {row['threads']} workers"] = row["images/s"]
    from benchmarks.train_step import bf16_peak_tflops

    peak = bf16_peak_tflops(gpu_name)  # the datasheet's dense bf16 peak, the one benchmarks.train_step uses
    for row in eager + compiled:
        kind = row["step"] + (" compiled" if row.get("compile") else "")
        tflops = row["images/s"] * TRAIN_GFLOP_224 * (row["res"] / 224) ** 2 / 1000
        out["step"][f"{kind} {row['res']} px"] = {"images/s": row["images/s"], "TFLOP/s": round(tflops, 1),
                                                  "peak TFLOP/s": peak,
                                                  "% of peak": round(100 * tflops / peak, 1) if peak else None}
    ours = {r["res"]: r["images/s"] for r in eager if r["step"] == "ours"}
    ours.update({r["res"]: r["images/s"] for r in compiled})  # the compiled rate where measured
    ref = {r["res"]: r["images/s"] for r in eager if r["step"] == "reference"}
    for res in sorted(ours):
        if res in ref and ref[res]:
            out["ratios"][f"ours / reference {res} px"] = round(ours[res] / ref[res], 2)
        fused = [r["images/s"] for r in dali_rows if r["pipeline"].endswith(("gpu", "cpu")) and r["res"] == res
                 and r["threads"] <= 6]
        if fused and ours[res]:
            out["ratios"][f"DALI (<= 6 threads) / step {res} px"] = round(max(fused) / ours[res], 2)
    if "train-main" in stages:
        tm = stages["train-main"].figures
        out["train_main"] = {"shards": tm.get("shards"), "resumed": tm.get("resumed"),
                             "stopped_at": tm.get("stopped_at"), "pipeline_ready": tm.get("pipeline_ready", []),
                             "epochs": [{k: e.get(k) for k in ("epoch", "resolution", "images_per_s", "pipeline_wait_s",
                                                               "eval_seconds", "decode", "top1")}
                                        for e in tm.get("epochs", [])]}
    if "train-main-compiled" in stages:
        tc = stages["train-main-compiled"].figures
        out["train_main_compiled"] = {"epochs": [{k: e.get(k) for k in ("epoch", "resolution", "images_per_s", "seconds",
                                                                       "top1")} for e in tc.get("epochs", [])]}
        eager = {e["resolution"]: e["images_per_s"] for e in out["train_main"].get("epochs", [])[:1]}
        for e in out["train_main_compiled"]["epochs"][:1]:
            if eager.get(e["resolution"]) and e.get("images_per_s"):
                out["ratios"][f"train.main compiled / eager, epoch 1 at {e['resolution']} px"] = round(
                    e["images_per_s"] / eager[e["resolution"]], 2)
    out["goals"] = goals(ours, ref, dali_rows, out["train_main"], gpu_name)
    return out


def goals(ours: dict, ref: dict, dali_rows: list, train_main: dict, gpu_name: str) -> list[dict]:
    """Issue 12's goals for one H200, each met / missed / n/a (never asserted)."""
    def judge(name, value, target, fmt="{:,.0f}"):
        if value is None:
            return {"goal": name, "value": "n/a", "status": "n/a"}
        return {"goal": name, "value": fmt.format(value), "status": "met" if value >= target else "missed"}

    h200 = "H200" in gpu_name
    rows = [judge("our step >= 6,000 images/s at 224 px (H200)", ours.get(224) if h200 else None, 6000),
            judge("our step >= 11,000 images/s at 160 px (H200)", ours.get(160) if h200 else None, 11000)]
    ratios = [ours[r] / ref[r] for r in ours if r in ref and ref[r]]
    rows.append(judge("ours >= 1.5x the reference step (worst resolution)", min(ratios) if ratios else None, 1.5,
                      "{:.2f}x"))
    for res in (160, 192):
        fused = [r["images/s"] for r in dali_rows if r["pipeline"] == "dali-gpu" and r["res"] == res and r["threads"] <= 6]
        value = max(fused) / ours[res] if fused and ours.get(res) else None
        rows.append(judge(f"DALI mixed >= 1.3x our step at {res} px, <= 6 threads", value, 1.3, "{:.2f}x"))
    # epochs whose pipeline was built during the previous validation (train.main's log says which)
    waits = [e["wait_s"] for e in train_main.get("pipeline_ready", []) if e["ahead"]]
    value = None if not waits else (1.0 if max(waits) < 0.5 else 0.0)
    row = judge("next epoch's pipeline ready before validation ends (wait < 0.5 s)", value, 1.0, "{}")
    if waits:
        row["value"] = f"waited {max(waits):.2f} s"
    rows.append(row)
    return rows


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def figure_lines(f: dict) -> list[str]:
    """The figures as markdown table rows (header included)."""
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {key} images/s | {_rate(value)} |" for key, value in f["dali"].items()]
    lines += [f"| torchvision DataLoader {key} images/s | {_rate(value)} |" for key, value in f["baseline"].items()]
    lines += [f"| {key}: build s, first batch s, another Python thread's speed meanwhile | {v['build s']}, "
              f"{v['first batch s']}, {v['other Python thread during build, % of its speed']} % |"
              for key, v in f.get("build", {}).items()]
    for key, value in f["step"].items():
        pct = (f", {value['% of peak']}% of the datasheet's {value['peak TFLOP/s']:g}"
               if value["% of peak"] is not None else "")
        lines.append(f"| step {key} images/s | {_rate(value['images/s'])} ({value['TFLOP/s']} TFLOP/s{pct}) |")
    lines += [f"| {key} | {value:.2f}x |" for key, value in f["ratios"].items()]
    for e in f["train_main"].get("epochs", []):
        evaluated = (f"eval {e['eval_seconds']} s, top-1 {100 * e['top1']:.2f}%"
                     if isinstance(e.get("top1"), (int, float)) else "not validated")
        lines.append(f"| train.main epoch {e['epoch']} ({e['resolution']} px, {e['decode']}) | {e['images_per_s']} img/s, "
                     f"pipeline wait {e['pipeline_wait_s']} s, {evaluated} |")
    for e in f.get("train_main_compiled", {}).get("epochs", []):
        lines.append(f"| train.main compiled epoch {e['epoch']} ({e['resolution']} px) | {e['images_per_s']} img/s "
                     f"steady, epoch {e['seconds']} s with the compile |")
    return lines


def goal_lines(f: dict) -> list[str]:
    return ["| goal | value | status |", "|---|---|---|"] + [f"| {g['goal']} | {g['value']} | {g['status']} |"
                                                           for g in f["goals"]]


def summary_text(suite: Suite) -> str:
    f = suite.figures()
    env = suite.env_info
    lines = [f"# GPU suite ({suite.profile}, {suite.device}) - {env.get('date_utc', _now())}, commit {env.get('commit', '?')}",
             f"device: {env.get('gpu', 'CPU only')} ({env.get('driver', '')}); torch {env.get('torch')} "
             f"CUDA {env.get('torch_cuda')}; DALI {env.get('nvidia-dali-cuda130') or env.get('nvidia-dali-cuda120') or 'absent'}; "
             f"nvImageCodec {env.get('nvidia-nvimgcodec-cu13') or env.get('nvidia-nvimgcodec-cu12') or '?'}; "
             f"shards: {suite.data.get('shards_kind', '?')}", "",
             "| stage | status | s | budget s | detail |", "|---|---|---|---|---|"]
    for r in suite.results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.budget_s:.0f} | {r.detail[:110].replace('|', '/')} |")
    lines += ["", *figure_lines(f), "", *goal_lines(f), "",
              f"files: {suite.out}/results.json, summary.md, BENCHMARKS.md, logs/"]
    return "\n".join(lines) + "\n"


def append_suite_entry(suite: Suite) -> None:
    from benchmarks.report import append_result

    f = suite.figures()
    rows = [{"stage": r.name, "status": r.status, "seconds": r.seconds, "detail": r.detail[:160]} for r in suite.results]
    env = suite.env_info
    device = f"{env['gpu']} ({env.get('driver', '')})" if env.get("gpu") else f"CPU, {env.get('cpus')} cores"
    versions = (f"torch {env.get('torch')}, DALI {env.get('nvidia-dali-cuda130') or env.get('nvidia-dali-cuda120')}, "
                f"nvImageCodec {env.get('nvidia-nvimgcodec-cu13') or env.get('nvidia-nvimgcodec-cu12')}; "
                f"shards: {suite.data.get('shards_kind', '?')}")
    notes = "\n".join([versions, "", *figure_lines(f), "", *goal_lines(f)])
    append_result("GPU suite", rows, f"python -m benchmarks.gpu_suite --profile {suite.profile} --device {suite.device}",
                  device, notes, path=suite.out / "BENCHMARKS.md")


def export(out: Path, dest: Path) -> list[Path]:
    """summary.md, results.json, BENCHMARKS.md and gpu-suite.tar.gz (out without shards, images, checkpoints,
    weights or files over ARCHIVE_FILE_LIMIT) into dest: what the device tool brings back. Each file is
    replaced whole (temp + rename), so a command killed mid-export leaves the previous stage's copy."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("summary.md", "results.json", "BENCHMARKS.md"):
        if (out / name).is_file():
            tmp = dest / f".{name}.tmp"
            shutil.copy2(out / name, tmp)
            os.replace(tmp, dest / name)
            copied.append(dest / name)
    archive, tmp = dest / "gpu-suite.tar.gz", dest / ".gpu-suite.tar.gz.tmp"
    skip = (*BULKY, ".tar.gz", ".tmp")  # .tar.gz: an --export folder inside --out
    small = lambda info: None if info.name.endswith(skip) or info.size > ARCHIVE_FILE_LIMIT else info  # noqa: E731
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname="gpu-suite", filter=small)
    os.replace(tmp, archive)
    copied.append(archive)
    return copied


# ---------------------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the stage's own process group (it was started in a new session)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    hit = next((line for line in reversed(lines) if "rror" in line or "FAILED" in line), lines[-1] if lines else "")
    return hit[:200]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _git_commit() -> str:
    from benchmarks.report import git_commit

    return git_commit()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


STAGE_NAMES = ("gpu-tests", "dali", "train-step", "train-main", "train-step-compiled", "train-main-compiled",
               "viz-eval", "proxy")
STAGE_INPUTS = {"dali": "photos", "train-main": "shards", "train-main-compiled": "shards", "proxy": "shards"}  # what each reads of the data stage


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", "--output", dest="out", type=Path, required=True, help="folder for every result, table and log (created)")
    p.add_argument("--profile", choices=["quick", "full"], default="quick",
                   help="quick: <= 8 min on one H100/H200; full: more sizes and steps, viz-eval, the proxy "
                        "(longer than one 10-minute device command: for a cloud GPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees one")
    p.add_argument("--real-shards", type=Path, default=None, help="shard folder of real photos (default: unpack "
                                                                  ".carry/data-pNN if present, else toy shards)")
    p.add_argument("--carry", type=Path, default=REPO / ".carry", help="where benchmarks.carry_data's parts are")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of: {', '.join(STAGE_NAMES)} "
                                                  "(env and data always run)")
    p.add_argument("--commit", default=None, help="commit to record when the checkout has no .git (a device copy)")
    p.add_argument("--export", type=Path, default=None, help="also copy the results and a .tar.gz of --out here, "
                                                            "refreshed after every stage")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds this command may still take (the device tool's limit less what ran before it): "
                        "the stages are planned to end before it (default: the profile's 500 s on a GPU)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.stages.split(",")) if args.stages else None
    if only and not only <= set(STAGE_NAMES):
        p.error(f"--stages {args.stages}: choose from {', '.join(STAGE_NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.commit:
        os.environ["BENCHMARK_COMMIT"] = args.commit  # for this process's own BENCHMARKS.md entry
    if args.deadline_s is not None and args.deadline_s <= 0:
        p.error(f"--deadline-s {args.deadline_s:g}: no time left to run anything")
    suite = Suite(args.out.resolve(), device, args.profile, args.real_shards, args.carry, args.commit,
                  export_dir=args.export, deadline_s=args.deadline_s)
    suite.run(only)
    summary = summary_text(suite)
    (suite.out / "summary.md").write_text(summary)
    try:
        append_suite_entry(suite)
    except Exception as exc:  # the summary and results are written already
        print(f"[gpu_suite] could not write BENCHMARKS.md: {exc}", file=sys.stderr)
    suite.write_results()
    if args.export:
        export(suite.out, args.export)
    print(summary, flush=True)
    failed = [r.name for r in suite.results if r.status in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
