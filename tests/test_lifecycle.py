"""The run folder's lifecycle (train/lifecycle.py) and the trainer's pre-flight checks: a finished run is never
trained over, changed settings are refused by name, --run.resume=force continues on purpose and keeps the
finished files, the default preset on a small machine is refused before it is OOM-killed, damaged shards
and unlearnable data are refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from preprocess import shard
from tests.conftest import write_synthetic_parquet
from tests.test_train import metrics, run, train_cmd
from train import checkpoint, config, lifecycle, preflight
from train.config import ConfigError

ONE_EPOCH = ["--schedule.epochs=1", "--val.flip_tta=false"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def fake_checkpoint(run_dir: Path, cfg: config.Config, *, epoch: int, step: int = 0, final: bool = False) -> None:
    """A last.pt with what lifecycle.plan reads (no weights needed for the decision)."""
    checkpoint.save_atomic({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": epoch, "step": step,
                            "config": config.to_dict(cfg), "best_top1": 0.5, "data_fingerprint": "abc"},
                           run_dir / "checkpoints" / "last.pt")
    if final:
        (run_dir / "model_final.pth").write_bytes(b"weights")


# -- decisions, on checkpoints made by hand ------------------------------------------------------------

def test_a_new_folder_starts_and_a_stopped_run_resumes_with_safe_changes_noted(tmp_path):
    cfg = config.resolve("smoke")
    assert lifecycle.plan(tmp_path / "new", cfg).state == "new"
    fake_checkpoint(tmp_path, cfg, epoch=3, step=5)
    faster = config.resolve("smoke", ["data.num_threads=2", "run.sync_every=7"])
    decided = lifecycle.plan(tmp_path, faster, "abc")
    assert decided.state == "stopped" and decided.checkpoint["step"] == 5
    assert any("data.num_threads: 1 -> 2" in note for note in decided.notes)


def test_changed_settings_are_refused_by_name_unless_forced(tmp_path):
    cfg = config.resolve("smoke")
    fake_checkpoint(tmp_path, cfg, epoch=3, step=5)
    other = config.resolve("smoke", ["data.batch_size=16", "optim.lr_per_256=0.8"])
    with pytest.raises(ConfigError) as refused:
        lifecycle.plan(tmp_path, other, "abc")
    message = str(refused.value)
    assert "data.batch_size: 32 -> 16" in message and "optim.lr_per_256: 0.2 -> 0.8" in message
    assert "--run.resume=force" in message and "config.yaml" in message and "\n" not in message
    forced = lifecycle.plan(tmp_path, config.resolve("smoke", ["data.batch_size=16", "run.resume=force"]), "abc")
    assert forced.state == "stopped" and any("data.batch_size" in n for n in forced.notes)


def test_other_shards_are_refused(tmp_path):
    cfg = config.resolve("smoke")
    fake_checkpoint(tmp_path, cfg, epoch=1, step=2)
    with pytest.raises(ConfigError, match="trained on other shards"):
        lifecycle.plan(tmp_path, cfg, "def")


def test_a_finished_run_is_refused_and_force_needs_more_epochs(tmp_path):
    cfg = config.resolve("smoke")
    fake_checkpoint(tmp_path, cfg, epoch=cfg.schedule.epochs, final=True)
    with pytest.raises(ConfigError, match=r"this run finished \(10 epochs, best top-1 50.00 %\)"):
        lifecycle.plan(tmp_path, config.resolve("smoke", ["data.batch_size=16"]), "abc")
    with pytest.raises(ConfigError, match="set --schedule.epochs above 10"):
        lifecycle.plan(tmp_path, config.resolve("smoke", ["run.resume=force"]), "abc")
    more = lifecycle.plan(tmp_path, config.resolve("smoke", ["run.resume=force", "schedule.epochs=12"]), "abc")
    assert more.state == "finished" and not [n for n in more.notes if "schedule.epochs" in n]


def test_run_json_marks_a_run_finished_even_without_model_final(tmp_path):
    cfg = config.resolve("smoke")
    fake_checkpoint(tmp_path, cfg, epoch=4)
    assert lifecycle.plan(tmp_path, cfg, "abc").state == "stopped"
    lifecycle.write_state(tmp_path, "finished", epochs=4)
    with pytest.raises(ConfigError, match="this run finished"):
        lifecycle.plan(tmp_path, cfg, "abc")


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    first = lifecycle.RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ConfigError, match=r"in use by train.main pid \d+"):
            lifecycle.RunLock(tmp_path).acquire()
    finally:
        first.release()
    again = lifecycle.RunLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_epoch_checkpoints_keep_the_newest_k_as_links(tmp_path):
    last = tmp_path / "last.pt"
    for epoch in range(1, 5):
        checkpoint.save_atomic({"epoch": epoch}, last)
        lifecycle.keep_epoch_checkpoint(last, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == ["epoch-003.pt", "epoch-004.pt"]
    assert checkpoint.load(tmp_path / "epoch-003.pt")["epoch"] == 3  # last.pt moved on; the link kept epoch 3
    lifecycle.keep_epoch_checkpoint(last, 5, keep=0)
    assert not list(tmp_path.glob("epoch-*.pt"))


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        lifecycle.check_out_dir(tmp_path / "f")


# -- memory pre-flight ---------------------------------------------------------------------------------

def test_activation_estimate_scales_with_pixels_and_depth():
    cfg = config.resolve("rn50")
    at_112 = preflight.activation_bytes_per_image(cfg.model, 1000, 112)
    at_224 = preflight.activation_bytes_per_image(cfg.model, 1000, 224)
    assert 3.6 < at_224 / at_112 < 4.4  # activations grow with the pixel count
    # ResNet-50 saves ~90 MiB per 224 px image for backward in fp32 (the usual ~100 MB/image figure)
    assert 70 * 2**20 < at_224 < 110 * 2**20
    small = config.resolve("rn50", ["model.arch=resnet18"]).model
    assert preflight.activation_bytes_per_image(small, 1000, 224) < at_224 / 2


def test_the_default_preset_on_a_24_gib_cpu_is_refused_with_the_fix():
    cfg = config.resolve("rn50")
    estimate = preflight.estimate_memory(cfg, 1000, amp_dtype=None, max_side=500)
    problem = preflight.memory_problem(estimate, (24 * 2**30, "available RAM"), cfg, "cpu")
    assert problem is not None and "batch 512 at 192 px" in problem
    assert "--config smoke" in problem and "--data.batch_size" in problem and "--run.memory_check=false" in problem
    fits = int(problem.split("about ")[2].split(" fits")[0])
    smaller = config.resolve("rn50", [f"data.batch_size={fits}"])
    assert preflight.memory_problem(preflight.estimate_memory(smaller, 1000, amp_dtype=None, max_side=500),
                                    (24 * 2**30, "available RAM"), smaller, "cpu") is None
    smoke = config.resolve("smoke")
    assert preflight.memory_problem(preflight.estimate_memory(smoke, 10, amp_dtype=None, max_side=96),
                                    (4 * 2**30, "available RAM"), smoke, "cpu") is None


def test_default_preset_refused_before_training(shards_dir, tmp_path, monkeypatch):
    """The command that the kernel OOM-killed: the refusal comes from the estimate against this machine."""
    estimate = sum(preflight.estimate_memory(config.resolve("rn50"), 10, amp_dtype=None, max_side=64).values())
    if estimate < 0.9 * preflight.available_memory(torch.device("cpu"), 1)[0]:
        pytest.skip("this machine has the memory for the rn50 preset on the CPU")
    proc = run([*train_cmd(shards_dir, tmp_path / "run")[:7]])  # python -m train.main --data D --out O, no preset
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc).startswith("train.main: error: pre-flight: batch 512") and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- end to end: finished, forced, damaged data, unlearnable data --------------------------------------

def test_finished_run_is_kept_and_force_continues_it(shards_dir, tmp_path):
    out = tmp_path / "run"
    first = run(train_cmd(shards_dir, out, *ONE_EPOCH, "--checkpoint.keep=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["state"] == "finished"
    kept = {name: digest(out / name) for name in ("model_final.pth", "checkpoints/best.pt", "checkpoints/last.pt")}

    again = run(train_cmd(shards_dir, out, *ONE_EPOCH, "--data.batch_size=8"))  # other settings, same --out
    assert again.returncode == 2 and "this run finished (1 epochs" in last_line(again), again.stderr[-2000:]
    assert {name: digest(out / name) for name in kept} == kept  # nothing was trained over

    more = run(train_cmd(shards_dir, out, "--schedule.epochs=3", "--val.flip_tta=false", "--run.resume=force",
                         "--checkpoint.keep=2"))
    assert more.returncode == 0, more.stderr[-3000:]
    archived = out / "finished-epoch-1"
    assert digest(archived / "model_final.pth") == kept["model_final.pth"]
    assert digest(archived / "best.pt") == kept["checkpoints/best.pt"]
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*.pt")) == ["epoch-002.pt", "epoch-003.pt"]
    assert checkpoint.load(out / "checkpoints" / "epoch-002.pt")["epoch"] == 2
    state = json.loads((out / "run.json").read_text())
    assert state["state"] == "finished" and state["epochs"] == 3 and "--run.resume=force" in state["command"]


def test_damaged_shards_are_refused_before_training(shards_dir, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    tar = sorted((data / "train").glob("*.tar"))[1]
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    tar.write_bytes(bytes(raw))
    proc = run(train_cmd(data, tmp_path / "run", *ONE_EPOCH))  # checksums are checked by default
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tar}: SHA-256 differs" in last_line(proc) and "re-run `python -m preprocess.shard`" in last_line(proc)
    tar.write_bytes(bytes(raw[:-1000]))  # truncated (a partial copy): the default size check sees it
    proc = run(train_cmd(data, tmp_path / "run", *ONE_EPOCH))
    assert proc.returncode == 2 and f"{tar}: " in last_line(proc) and "manifest says" in last_line(proc)


def test_verified_shards_are_remembered_by_size_and_mtime(shards_dir, tmp_path, monkeypatch):
    from preprocess.manifest import load_manifest

    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    manifest = load_manifest(data)
    bad, good = preflight.verify_checksums(data, manifest)
    assert not bad and len(good) == sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))
    halves = [preflight.verify_checksums(data, manifest, part, 2)[1] for part in (0, 1)]
    assert not halves[0].keys() & halves[1].keys() and {**halves[0], **halves[1]} == good  # a split of the work
    preflight.write_verified(data, good)
    monkeypatch.setattr(preflight, "file_sha256", lambda path: pytest.fail(f"{path} was read again"))
    assert preflight.verify_checksums(data, manifest, verified=preflight.read_verified(data)) == ([], good)
    tar = sorted((data / "val").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes())  # same bytes, new mtime: read again
    monkeypatch.setattr(preflight, "file_sha256", lambda path: manifest["splits"]["val"]["shards"][0]["sha256"])
    assert not preflight.verify_checksums(data, manifest, verified=preflight.read_verified(data))[0]


@pytest.fixture(scope="module")
def few_class_shards(tmp_path_factory) -> dict[int, Path]:
    out = {}
    for classes in (1, 3):
        root = tmp_path_factory.mktemp(f"classes{classes}")
        write_synthetic_parquet(root / "parquet", classes=classes, per_class=40, val_per_class=10)
        shard.run(str(root / "parquet"), root / "shards", images_per_shard=40, workers=1, progress=False)
        out[classes] = root / "shards"
    return out


def test_one_class_is_refused_and_top5_is_na_for_3_classes(few_class_shards, tmp_path):
    proc = run(train_cmd(few_class_shards[1], tmp_path / "one", *ONE_EPOCH))
    assert proc.returncode == 2 and "holds images of 1 class(es)" in last_line(proc), proc.stderr[-2000:]
    proc = run(train_cmd(few_class_shards[3], tmp_path / "three", *ONE_EPOCH))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = metrics(tmp_path / "three")[-1]
    assert "top1" in record and "top5" not in record
    assert "top-5 n/a (5 classes or fewer)" in proc.stdout


# -- flags users type, and what a run leaves to read ---------------------------------------------------

def test_timm_and_torchvision_flags():
    from train.main import parse_args

    _, overrides = parse_args(["--data", "d", "--out", "o", "--epochs", "3", "--batch-size=8", "--lr", "0.5",
                               "--workers", "2", "--seed=4"])
    assert overrides == ["schedule.epochs=3", "data.batch_size=8", "optim.lr=0.5", "data.num_threads=2",
                         "run.seed=4"]
    for flag, fragment in (("--resume", "resumes by itself"), ("--amp", "--run.precision"),
                           ("--pretrained", "--model.init=torchvision")):
        with pytest.raises(ConfigError, match=fragment):
            parse_args(["--data", "d", "--out", "o", flag, "x"])


def test_a_run_leaves_log_txt_summary_csv_and_an_end_of_run_block(few_class_shards, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(few_class_shards[3], out, "--schedule.epochs=2", "--val.every_epochs=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run finished: 2 epochs" in proc.stdout and f"next: python -m viz.report {out}" in proc.stdout
    log = (out / "log.txt").read_text()
    assert "$ python -m train.main" in log and "final top-1" in log and "\r" not in log  # no progress redraws
    rows = [line.split(",") for line in (out / "summary.csv").read_text().splitlines()]
    assert rows[0][:5] == ["epoch", "train_loss", "eval_top1", "eval_top5", "lr"]
    assert [r[0] for r in rows[1:]] == ["1", "2"] and rows[1][2] == ""  # epoch 1 was not validated
    assert float(rows[2][2]) == pytest.approx(100 * metrics(out)[-1]["top1"]) and rows[2][3] == ""  # top-5: n/a


def test_a_run_folder_on_a_too_small_disk_is_refused_before_the_first_step(tmp_path):
    cfg = config.resolve("rn50")
    need = preflight.run_disk_need(cfg, 1000)
    params = 25_557_032  # torchvision's ResNet-50 with 1000 classes
    # checkpoints of weights + momentum (4 bytes each); last.pt, a write's temp file, 2 epoch ends, an older best
    assert need == {"checkpoints": params * 8 * 5, "final weights": params * 8}
    assert preflight.disk_problem(tmp_path / "new" / "run", need, free=sum(need.values())) is None
    line = preflight.disk_problem(tmp_path / "run", need, free=2**29)
    assert line.startswith(f"pre-flight: the run folder {tmp_path / 'run'} is on a disk with 0.50 GiB free, but "
                           f"this run writes up to 1.14 GiB more") and "--checkpoint.keep" in line
    ema = preflight.run_disk_need(config.resolve("rn50", ["ema.enabled=true", "checkpoint.keep=0"]), 1000)
    assert ema["checkpoints"] == params * 12 * 3
    # a resumed run: what the folder holds counts as written; a hard link (best.pt) counts once
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(bytes(10_000_000))
    (run / "checkpoints" / "best.pt").hardlink_to(run / "checkpoints" / "last.pt")
    (run / "log.txt").write_bytes(bytes(5_000_000))  # not a weights file: not counted
    small = {"checkpoints": 25_000_000}
    assert preflight.disk_problem(run, small, free=15_000_000) is None
    assert preflight.disk_problem(run, small, free=14_999_999) is not None
