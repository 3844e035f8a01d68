"""benchmarks.proxy: folder -> shards -> imagenette preset -> train.main -> report rows, on a tiny JPEG tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import proxy
from benchmarks.report import COMMIT_ENV as REPORT_COMMIT_ENV
from benchmarks.report import ENV_PATH as REPORT_FILE_ENV
from benchmarks.report import REPO
from train import config, main as train_main

WNIDS = ("n01440764", "n02102040", "n02979186")


def write_image_folder(root: Path, train_per_class: int = 6, val_per_class: int = 2, size: int = 40) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: each class its own colour plus noise, one grayscale file."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.zeros((size, size, 3), np.uint8)
                pixels[..., c] = 200
                pixels += rng.integers(0, 40, pixels.shape, dtype=np.uint8)
                image = Image.fromarray(pixels)
                if split == "train" and i == 0:
                    image = image.convert("L")  # Imagenette has 242 of these
                image.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (REPO / "docs").rglob("*") if p.is_file()}


def test_preset_resolves_with_the_documented_recipe():
    cfg = config.resolve("imagenette")
    assert cfg.model.arch == "resnet50" and cfg.model.blurpool and cfg.ema.enabled and cfg.val.flip_tta
    assert (cfg.schedule.res_min, cfg.schedule.res_max, cfg.val.res) == (96, 128, 128)
    assert round(cfg.val.res / cfg.val.crop_ratio) == 144  # the centre 128 px of the 144 px images
    assert cfg.optim.label_smoothing == pytest.approx(0.1)


@pytest.mark.parametrize("device", sorted(proxy.PROTOCOLS))
@pytest.mark.parametrize("ablation", [None, *proxy.ABLATIONS])
def test_every_proxy_command_line_is_accepted_by_train_main(device, ablation, tmp_path):
    protocol = proxy.PROTOCOLS[device]
    extra = [*protocol.overrides, *(proxy.ablation_overrides(ablation, protocol.res) if ablation else [])]
    for epochs in protocol.epochs:
        argv = proxy.train_argv(tmp_path / "shards", tmp_path / "run", epochs=epochs, res=protocol.res,
                                device=device, threads=2, extra=extra)
        args, overrides = train_main.parse_args(argv)
        cfg = config.resolve(args.config, overrides)  # raises ConfigError on anything invalid
        assert (cfg.schedule.epochs, cfg.schedule.res_max, cfg.val.res, cfg.run.device) == (
            epochs, protocol.res, protocol.res, device)
        expected = {"blurpool": ("model", "blurpool", False), "label_smoothing": ("optim", "label_smoothing", 0.0),
                    "progressive": ("schedule", "res_min", protocol.res)}.get(ablation)
        if expected:
            section, key, value = expected
            assert getattr(getattr(cfg, section), key) == value
        else:
            assert cfg.schedule.res_min == proxy.res_min_for(protocol.res) < protocol.res


def test_res_min_is_three_quarters_on_the_grid():
    assert [proxy.res_min_for(r) for r in (128, 64, 160, 16)] == [96, 48, 128, 16]


def test_summary_rows_pair_with_the_leaderboard_and_weight_throughput_by_time():
    metrics = [{"epoch": 1, "train_loss": 2.0, "resolution": 96, "images_per_s": 100.0, "seconds": 10.0,
                "top1": 0.5, "top5": 0.9, "top1_raw": 0.45},
               {"epoch": 5, "train_loss": 1.0, "resolution": 128, "images_per_s": 50.0, "seconds": 30.0,
                "top1": 0.8, "top5": 0.99, "top1_raw": 0.78}]
    row = proxy.summarize(metrics, name="e5", res=128, wall_seconds=61.04, resumed=False)
    assert row["top-1 %"] == "80.0" and row["top-5 %"] == "99.0" and row["train px"] == "96->128"
    assert row["fastai 128 px top-1 %"] == 85.77
    assert row["train images/s"] == pytest.approx((1000 + 1500) / 40, abs=0.05)
    assert row["wall s"] == 61.0
    raw = proxy.summarize(metrics, name="e5 raw", res=128, wall_seconds=61.0, resumed=False, raw_weights=True)
    assert raw["top-1 %"] == "78.0" and raw["wall s"] == "same run"
    assert proxy.summarize(metrics, name="e5", res=64, wall_seconds=1, resumed=True)["fastai 128 px top-1 %"] == "-"
    assert proxy.curve(metrics) == "1:50.0 5:80.0"


def test_proxy_turns_a_folder_into_shards_a_run_and_report_rows(tmp_path, capsys, monkeypatch):
    src = write_image_folder(tmp_path / "folder")
    out, report = tmp_path / "proxy", tmp_path / "BENCH.md"
    # A commit made while the runs train must not be credited with their figures: the report names the
    # commit the benchmark started from.
    monkeypatch.setenv(REPORT_COMMIT_ENV, "start11")
    run_command = proxy.run_command

    def commit_meanwhile(*args, **kwargs):
        result = run_command(*args, **kwargs)
        os.environ[REPORT_COMMIT_ENV] = "later22"
        return result

    monkeypatch.setattr(proxy, "run_command", commit_meanwhile)
    code = proxy.main(["--src", str(src), "--out", str(out), "--device", "cpu", "--epochs", "1", "--res", "32",
                       "--ablate", "ema", "--train-per-class", "4", "--report", str(report), "--model.arch=resnet18", "--data.batch_size=4",
                       "--val.batch_size=4", "--val.flip_tta=false", "--run.tensorboard=false",
                       "--schedule.warmup_epochs=0.5"])
    assert code == 0
    assert f"appended to {report}" in capsys.readouterr().out
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert [c["wnid"] for c in manifest["classes"]] == list(WNIDS)
    assert manifest["splits"]["train"]["images"] == 12 and manifest["splits"]["val"]["images"] == 6
    assert manifest["splits"]["train"]["per_class"] == [4, 4, 4]  # a class-balanced subset of train
    links = list((out / "subset" / "train").rglob("*.JPEG"))
    assert len(links) == 12 and all(p.is_symlink() and p.resolve().parent.parent == src / "train" for p in links)
    run = out / "runs" / "e1"
    stored = (run / "config.yaml").read_text()
    assert "ema:\n  enabled: true" in stored and "label_smoothing: 0.1" in stored  # the preset, not defaults
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["val_images"] == 6 and metrics[0]["resolution"] == 32
    assert (out / "curves-e1.png").stat().st_size > 1000
    results = json.loads((out / "proxy.json").read_text())["results"]
    assert [r["run"] for r in results] == ["e1"] and results[0]["metrics"] == metrics

    text = report.read_text()
    assert "## Real photos (Imagenette proxy)" in text and "python -m benchmarks.proxy --src" in text
    assert "commit `start11`" in text and "later22" not in text
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| e1")]
    assert [r[0] for r in rows] == ["e1 (recipe)", "e1 (no ema: raw weights)"]
    assert float(rows[0][4]) == pytest.approx(100 * metrics[0]["top1"], abs=0.05)  # 3 significant digits
    assert float(rows[1][4]) == pytest.approx(100 * metrics[0]["top1_raw"], abs=0.05)
    assert "12 train / 6 val images, 3 classes" in text and "e1: 1:" in text

    # The same command with a second seed trains only the new run and reports the finished one as it is.
    trained = []

    def record(args, *rest, **kwargs):
        if args[:2] == ["-m", "train.main"]:
            trained.append(args)
        return run_command(args, *rest, **kwargs)

    monkeypatch.setattr(proxy, "run_command", record)
    before = (run / "metrics.jsonl").read_text()
    code = proxy.main(["--shards", str(out / "shards"), "--out", str(out), "--device", "cpu", "--epochs", "1",
                       "--res", "32", "--ablate", "ema", "--seeds", "0", "1", "--report", str(report),
                       "--model.arch=resnet18", "--data.batch_size=4", "--val.batch_size=4", "--val.flip_tta=false",
                       "--run.tensorboard=false", "--schedule.warmup_epochs=0.5"])
    assert code == 0
    assert len(trained) == 1 and "--run.seed=1" in trained[0] and str(out / "runs" / "e1-seed1") in trained[0]
    assert (run / "metrics.jsonl").read_text() == before  # seed 0 was not trained again
    second = report.read_text()[len(text):]
    assert "| e1 (recipe) |" in second and "(earlier run, epochs only)" in second
    assert "| e1-seed1 (recipe) |" in second and "Top-1 over seeds 0 1" in second
    seed1 = [json.loads(line) for line in (out / "runs" / "e1-seed1" / "metrics.jsonl").read_text().splitlines()]
    mean = (100 * metrics[0]["top1"] + 100 * seed1[0]["top1"]) / 2
    assert f"| 1 | recipe | 2 | {mean:.1f} |" in second

    # Without --report the same results are printed and no markdown file is touched.
    trained.clear()
    monkeypatch.delenv(REPORT_FILE_ENV, raising=False)
    capsys.readouterr()
    docs_before, report_before = docs_files(), report.read_text()
    code = proxy.main(["--shards", str(out / "shards"), "--out", str(out), "--device", "cpu", "--epochs", "1",
                       "--res", "32", "--ablate", "ema", "--seeds", "0", "1", "--model.arch=resnet18",
                       "--data.batch_size=4", "--val.batch_size=4", "--val.flip_tta=false", "--run.tensorboard=false",
                       "--schedule.warmup_epochs=0.5"])
    assert code == 0 and not trained
    printed = capsys.readouterr().out
    assert "| e1 (recipe) |" in printed and "| e1-seed1 (recipe) |" in printed and "Top-1 over seeds 0 1" in printed
    assert f"| 1 | recipe | 2 | {mean:.1f} |" in printed and "appended to" not in printed
    assert report.read_text() == report_before and docs_files() == docs_before

    # A finished run trained with other settings is refused, not reported under this command's name.
    trained.clear()
    code = proxy.main(["--shards", str(out / "shards"), "--out", str(out), "--device", "cpu", "--epochs", "1",
                       "--res", "32", "--no-report", "--model.arch=resnet18", "--data.batch_size=4",
                       "--val.batch_size=4", "--val.flip_tta=false", "--run.tensorboard=false",
                       "--schedule.warmup_epochs=0.5", "--optim.lr_per_256=0.05"])
    assert code == 2 and not trained
    preset_lr = config.resolve(proxy.PRESET).optim.lr_per_256
    assert f"is a finished run with other settings (optim.lr_per_256: {preset_lr!r} -> 0.05)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--res", "50"], "--res 50: must be a positive multiple of 16"),
    (["--ablate", "dropout"], "--ablate dropout: choose from"),
    (["--epochs", "0"], "every count must be at least 1"),
    (["--run.seed=3"], "--run.seed: use --seeds"),
    (["--seeds", "1", "1"], "--seeds 1 1: distinct seeds"),
])
def test_bad_flags_get_one_line_errors(argv, message, tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    assert proxy.main(["--shards", str(tmp_path / "shards"), "--device", "cpu", "--out", str(tmp_path / "o"),
                       *argv]) == 2
    assert message in capsys.readouterr().err


def test_seed_summary_means_ranges_and_same_seed_differences():
    def result(variant, seed, top1, raw=None):
        last = {"epoch": 3, "top1": top1, **({"top1_raw": raw} if raw is not None else {})}
        return {"variant": variant, "seed": seed, "epochs": 3, "metrics": [{"epoch": 2}, last]}

    rows = proxy.seed_summary([result("recipe", 0, 0.40, raw=0.38), result("recipe", 1, 0.30, raw=0.34),
                               result("no blurpool", 0, 0.35), result("no blurpool", 1, 0.20)])
    by = {r["variant"]: r for r in rows}
    assert by["recipe"]["top-1 % mean"] == "35.0" and by["recipe"]["min-max"] == "30.0-40.0"
    assert by["recipe"]["vs recipe, mean of same-seed differences"] == ""
    assert by["no blurpool"]["vs recipe, mean of same-seed differences"] == "-7.5"  # (-5 - 10) / 2
    assert by["no ema: raw weights"]["top-1 % mean"] == "36.0"
    assert by["no ema: raw weights"]["vs recipe, mean of same-seed differences"] == "+1.0"
    assert by["no blurpool"]["per seed"] == "0:35.0 1:20.0"


def test_run_names_keep_seed_zero_unsuffixed():
    assert proxy.run_name(3, "recipe", 0) == "e3"
    assert proxy.run_name(3, "no label_smoothing", 0) == "e3-label-smoothing-off"
    assert proxy.run_name(5, "no blurpool", 2) == "e5-blurpool-off-seed2"


def test_shards_without_a_manifest_are_refused(tmp_path, capsys):
    assert proxy.main(["--shards", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
