"""viz evaluates as the trainer does (same top-1, same prediction for every image), folders go through the
same decode/resize/crop as shards, other trainers' checkpoints load, and viz.report writes one HTML file
(pictures inlined, no path of the machine) that a real headless Chromium renders without errors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocess.manifest import split_shards
from preprocess.sources import ClassInfo
from viz import evaluate as evaluation, loader, report
from viz.datasets import open_data
from viz.gradcam import prepare, run_evaluation

ROOT = Path(__file__).resolve().parents[1]
# One epoch (4 steps of 50 images at 32 px) of a ResNet-18 with EMA and flip TTA: the EMA weights are the
# ones the trainer validated.
# The tiny runs were tuned at smoke's former rate; pinned so that a preset change does not move them.
TINY = ["--config", "smoke", "--optim.lr_per_256=0.8", "--model.arch=resnet18", "--data.batch_size=50", "--data.num_threads=1",
        "--val.batch_size=35", "--schedule.res_min=32", "--schedule.res_max=64", "--val.res=64",
        "--run.tensorboard=false", "--checkpoint.every_minutes=0", "--schedule.epochs=1", "--ema.enabled=true",
        "--ema.decay=0.5", "--val.flip_tta=true"]
SETTINGS = dict(num_classes=None, weights="auto", blurpool="auto", flip_tta="auto", device="cpu",
                precision="auto", batch_size=None, res=None, crop_ratio=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory) -> Path:
    """A 1-epoch run of the trainer (its best.pt, metrics.jsonl, config.yaml) on the shared test shards."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "train.main", "--data", str(shards_dir), "--out", str(out), *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def last_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


class _Relabelled:
    """The trainer's ValLoader with each image's label replaced by the class viz predicted for it."""

    def __init__(self, val_loader, predicted: dict[str, int]):
        self.val_loader, self.predicted = val_loader, predicted

    def __iter__(self):
        for images, _, keys in self.val_loader:
            yield images, torch.tensor([self.predicted[k] for k in keys])


def test_viz_top1_is_the_trainers_to_the_image(tiny_run, shards_dir):
    from train import engine
    from train.config import ModelConfig
    from train.data import ValLoader
    from train.model import build_model

    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    record = best["history"][-1]
    setup = prepare(str(tiny_run / "checkpoints" / "best.pt"), **SETTINGS)
    assert setup.loaded.weights == "ema" and setup.flip and setup.res == 64 and setup.batch_size == 35
    result = run_evaluation(setup.model, open_data(shards_dir), res=setup.res, crop_ratio=setup.crop_ratio,
                            batch_size=setup.batch_size, limit=None, threads=1, flip=setup.flip, progress=False)
    # The trainer's logged numbers, as counts of images: equal, not close.
    assert len(result.predictions) == record["val_images"]
    assert sum(p.correct for p in result.predictions) == round(record["top1"] * record["val_images"])
    assert sum(p.top5_correct for p in result.predictions) == round(record["top5"] * record["val_images"])
    assert setup.loaded.info["trainer_top1"] == record["top1"] == best["best_top1"]

    # Image by image: the trainer's own model, loader and evaluate() score viz's predictions as the labels,
    # so top-1 = 1 exactly when viz predicted, for every image, the class the trainer's evaluation ranks first.
    config = best["config"]
    model = build_model(ModelConfig(**config["model"]), len(setup.loaded.model.fc.bias))
    model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(best["ema"]["model"])
    val = ValLoader(shards_dir, config["val"]["batch_size"], res=config["val"]["res"],
                    crop_ratio=config["val"]["crop_ratio"], num_threads=1, with_keys=True)
    predicted = {p.key: p.predicted for p in result.predictions}
    agreement = engine.evaluate(model, _Relabelled(val, predicted), device=torch.device("cpu"), amp_dtype=None,
                                flip_tta=config["val"]["flip_tta"])
    assert agreement["images"] == len(predicted) and agreement["top1"] == 1.0
    truth = engine.evaluate(model, ((images, labels) for images, labels, _ in val), device=torch.device("cpu"),
                            amp_dtype=None, flip_tta=config["val"]["flip_tta"])
    assert truth["top1"] == pytest.approx(result.top1, abs=0) and truth["top5"] == pytest.approx(result.top5, abs=0)


def export_folder(shards_dir: Path, out: Path) -> Path:
    """The shards' val JPEGs, byte for byte, as an ImageFolder val/c<label>/<key>.jpg."""
    for tar, _ in split_shards(shards_dir, "val"):
        with tarfile.open(tar) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name in members:
                if name.endswith(".jpg"):
                    key = name[:-4]
                    label = int(archive.extractfile(members[key + ".cls"]).read())
                    (out / "val" / f"c{label}").mkdir(parents=True, exist_ok=True)
                    (out / "val" / f"c{label}" / name).write_bytes(archive.extractfile(members[name]).read())
    return out


def test_folder_input_goes_through_the_same_decode_resize_crop(shards_dir, tmp_path):
    folder = open_data(export_folder(shards_dir, tmp_path))
    shards = open_data(shards_dir)
    assert folder.layout == "imagefolder" and folder.size == shards.size
    # The pixels: ValLoader's tensors equal the folder pipeline's for the same JPEG bytes.
    from train.data import ValLoader

    val = ValLoader(shards_dir, 16, res=48, crop_ratio=0.8, num_threads=1, with_keys=True)
    images, _, keys = next(iter(val))
    by_key = {key: i for i, (key, _, _) in enumerate(folder.files)}
    fetched = loader.fetch_images(folder, [by_key[k] for k in keys], res=48, crop_ratio=0.8, num_threads=1)
    assert torch.equal(torch.stack([fetched[by_key[k]] for k in keys]), images.float())
    # Random access into the shards (for Grad-CAM) finds the same images at the same positions.
    again = loader.fetch_images(shards, list(range(len(keys))), res=48, crop_ratio=0.8, num_threads=1)
    assert torch.equal(torch.stack([again[i] for i in range(len(keys))]), images.float())
    # The predictions of a model on both inputs, image by image (labels: the folder's class names are c<i>).
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    a = run_evaluation(model, shards, res=48, crop_ratio=0.8, batch_size=16, limit=None, threads=1, flip=False,
                       progress=False)
    b = run_evaluation(model, folder, res=48, crop_ratio=0.8, batch_size=16, limit=None, threads=1, flip=False,
                       progress=False)
    names = [c.name for c in folder.classes]
    assert {p.key: (p.label, p.predicted) for p in a.predictions} == {
        p.key: (int(names[p.label][1:]), int(names[p.predicted][1:])) for p in b.predictions}
    assert a.top1 == b.top1


def test_other_trainers_checkpoints(tiny_run, shards_dir, tmp_path):
    """PyTorch's ImageNet example (model_best.pth.tar with "module." keys), torch.compile's "_orig_mod." and
    a plain torchvision state_dict all load to the same weights; --weights model picks the raw ones."""
    from viz.weights import VizError, load_model

    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    ema, raw = best["ema"]["model"], best["model"]
    torch.save({"epoch": 2, "arch": "resnet18", "best_acc1": torch.tensor(12.5),
                "state_dict": {f"module.{k}": v for k, v in ema.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, tmp_path / "model_best.pth.tar")
    torch.save({f"_orig_mod.{k}": v for k, v in ema.items()}, tmp_path / "compiled.pth")
    example = load_model(tmp_path / "model_best.pth.tar")
    assert example.arch == "resnet18" and example.info == {"epoch": 2, "arch": "resnet18", "best_acc1": 12.5}
    compiled = load_model(tmp_path / "compiled.pth")
    ours = load_model(tiny_run / "checkpoints" / "best.pt")
    for other in (example, compiled):
        assert all(torch.equal(a, b) for a, b in zip(other.model.state_dict().values(),
                                                     ours.model.state_dict().values()))
    raw_loaded = load_model(tiny_run / "checkpoints" / "best.pt", weights="model")
    assert raw_loaded.weights == "model" and torch.equal(raw_loaded.model.fc.weight, raw["fc.weight"])
    assert "trainer_top1" not in raw_loaded.info  # the trainer validated the EMA weights, not these
    with pytest.raises(VizError, match="no EMA weights|not one of our checkpoints"):
        load_model(tmp_path / "compiled.pth", weights="ema")
    torch.save({"arch": "resnet50", "state_dict": ema}, tmp_path / "liar.pth.tar")
    with pytest.raises(VizError, match="says arch 'resnet50'"):
        load_model(tmp_path / "liar.pth.tar")


# ----------------------------------------------------------------------------- the report

@pytest.fixture(scope="module")
def built_report(tiny_run, shards_dir) -> Path:
    assert report.main([str(tiny_run), "--data", str(shards_dir), "--num-show", "4", "--classes", "3",
                        "--pairs", "4", "--num-threads", "1", "--no-progress", "--device", "cpu"]) == 0
    return tiny_run / "report" / "report.html"


SECTIONS = ("summary", "curves", "classes", "confusions", "mistakes", "worst-classes", "config")


def _picture(source: str) -> Image.Image:
    mime, data = re.fullmatch(r"data:(image/\w+);base64,([A-Za-z0-9+/=]+)", source).groups()
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.get_format_mimetype() == mime
    return image


def test_report_is_one_file_and_complete(built_report, tiny_run, shards_dir, tmp_path_factory, capsys):
    page = built_report.read_text()
    for section in SECTIONS:
        assert f"<section id={section}>" in page
    # One file: every picture inlined, no script, no link, no other file beside it but the predictions.
    assert "<script" not in page and "href=" not in page.replace("<link rel=icon href='data:,'>", "")
    sources = re.findall(r"src='([^']+)'", page)
    assert len(sources) == page.count("<img ") and all(s.startswith("data:image/") for s in sources)
    assert sorted(p.name for p in built_report.parent.iterdir()) == ["predictions.csv", "predictions.json",
                                                                     "report.html"]
    pictures = [_picture(s) for s in sources]
    widths = [p.size[0] for p in pictures]
    assert widths.count(1500) == 1 and widths.count(1000) == 1  # training curves, per-class chart
    assert widths.count(3 * report.STRIP_SIDE + 2 * report.render.PAD) >= 4  # 4 mistakes + worst classes' rows
    assert widths.count(report.THUMB_SIDE) >= 1
    # No path of the machine: the run, the data and the checkpoint are named relative to the page's folder.
    for root in {str(tmp_path_factory.getbasetemp()), os.path.realpath(tmp_path_factory.getbasetemp())}:
        assert root not in page
    assert f"<code>{os.path.relpath(shards_dir, built_report.parent)}</code>" in page
    assert "<code>../checkpoints/best.pt</code>" in page and "<code>../metrics.jsonl</code>" in page
    assert f"# data: {os.path.relpath(shards_dir, built_report.parent)}" in page  # config.yaml's comment
    record = last_record(tiny_run)
    assert f"{100 * record['top1']:.2f}%" in page and "the same count of correct images" in page
    assert "Worst 3 classes" in page and "Best 3 classes" in page and "(10 classes)" in page
    saved = evaluation.load(built_report.parent / "predictions.csv")
    assert len(saved.predictions) == record["val_images"] and saved.top1 == pytest.approx(record["top1"], abs=1e-9)
    assert all(len(p.top5) == 5 and p.top5_probs == tuple(sorted(p.top5_probs, reverse=True))
               for p in saved.predictions)
    # A second report reads the saved predictions back instead of evaluating again.
    capsys.readouterr()
    assert report.main([str(tiny_run), "--data", str(shards_dir), "--num-show", "2", "--classes", "3",
                        "--num-threads", "1", "--no-progress", "--device", "cpu",
                        "--output", str(built_report.parent)]) == 0
    printed = capsys.readouterr().out
    assert "read back: top-1" in printed
    assert re.search(r"^wrote (\S+) \(\d+\.\d MiB, pictures inlined", printed, re.M)[1] == str(built_report)


def test_counts_of_one_and_paths_in_config_text(tmp_path):
    """'The worst class', not 'Worst 1 classes'; absolute paths in config text become relative ones."""
    from viz.datasets import ValData
    from viz.select import ClassScore

    data = ValData("imagefolder", str(tmp_path), (ClassInfo("n1", "tench"), ClassInfo("n2", "goldfish")), 4)
    findings = report.Findings([ClassScore(1, 2, 1, 2), ClassScore(0, 2, 2, 2)], [], [], [], {})
    html = report._classes(data, findings, 8, "data:,")
    assert "The worst class</h3>" in html and "The best class</h3>" in html and "(2 classes)" in html
    assert " 1 classes" not in html and "Top-1 of each class" in html
    one = report.Findings([ClassScore(0, 2, 1, 2)], [], [], [], {})
    assert "The worst class</h3>" in report._classes(data, one, 8, "data:,") and "(1 class)" in report._classes(
        data, one, 8, "data:,")
    here = tmp_path / "run" / "report"
    text = f"# data: {tmp_path}/shards\nmodel:\n  init: '{tmp_path}/w.pt'\nlr: 1/256\nurl: https://x.org/a\n"
    assert report._relative_paths(text, here) == (
        "# data: ../../shards\nmodel:\n  init: '../../w.pt'\nlr: 1/256\nurl: https://x.org/a\n")


def test_report_errors_are_one_line(tmp_path, shards_dir, capsys):
    assert report.main([str(tmp_path), "--data", str(shards_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoints/best.pt" in err


def _browser_paths() -> tuple[str | None, str | None]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    return chromium, shutil.which("chromedriver")


def test_report_renders_in_headless_chromium(built_report):
    chromium, driver_path = _browser_paths()
    if chromium is None or driver_path is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(built_report.resolve().as_uri())
        sections = browser.execute_script("return [...document.querySelectorAll('section')].map(s => s.id)")
        assert sections == list(SECTIONS)
        images = browser.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert len(images) >= 8 and all(ok for _, ok in images), [src for src, ok in images if not ok]
        headings = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.innerText)")
        assert "Per-class accuracy" in headings and "Most confused pairs" in headings
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    pixels = np.asarray(shot, dtype=np.float32)
    assert shot.size[0] >= 1000 and pixels.std() > 20  # text, tables and figures, not a blank page
    assert (pixels < 128).mean() > 0.01  # some dark ink on the white page


def test_old_flags_on_tiny_imagenet_layout_measure_the_trainers_top1(tiny_run, shards_dir, tmp_path, capsys):
    """A seed user's command: PyTorch-example checkpoint, Tiny-ImageNet val folder, the old flag names."""
    from viz import gradcam

    folder = export_folder(shards_dir, tmp_path / "export") / "val"
    tiny = tmp_path / "tiny-imagenet"
    (tiny / "val" / "images").mkdir(parents=True)
    lines = []
    for class_dir in sorted(folder.iterdir()):
        for image in sorted(class_dir.iterdir()):
            image.rename(tiny / "val" / "images" / image.name)
            lines.append(f"{image.name}\t{class_dir.name}\t0\t0\t8\t8")
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (tiny / "wnids.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    torch.save({"epoch": 1, "arch": "resnet18", "best_acc1": 0.0,
                "state_dict": {f"module.{k}": v for k, v in best["ema"]["model"].items()}},
               tmp_path / "model_best.pth.tar")
    out = tmp_path / "grid.png"
    assert gradcam.main(["--checkpoint_path", str(tmp_path / "model_best.pth.tar"), "--validation_img_path",
                         str(tiny / "val"), "--output_path", str(out), "--num_classes", "10", "--num_show", "3",
                         "--res", "64", "--blurpool", "on", "--flip-tta", "on", "--batch-size", "35",
                         "--device", "cpu", "--workers", "1", "--no-progress"]) == 0
    record = best["history"][-1]
    assert f"top-1 {record['top1']:.2%} " in capsys.readouterr().out
    saved = evaluation.load(out.with_name("grid_predictions.csv"))
    assert len(saved.predictions) == record["val_images"] and saved.meta["data"] == str(tiny / "val")


# ----------------------------------------------------------------------------- the trainer's top1_raw

def test_top1_raw_is_an_evaluation_of_the_raw_weights(tiny_run, shards_dir):
    """With EMA on, the trainer logs top1 of the EMA weights and top1_raw of the trained ones: both equal a
    fresh evaluation (trainer's model, loader and evaluate()) of the weights saved in best.pt."""
    from train import engine
    from train.config import ModelConfig
    from train.data import ValLoader
    from train.model import build_model

    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    record, config = best["history"][-1], best["config"]
    val = ValLoader(shards_dir, config["val"]["batch_size"], res=config["val"]["res"],
                    crop_ratio=config["val"]["crop_ratio"], num_threads=1)
    top1 = {}
    for name, weights in (("raw", best["model"]), ("ema", best["ema"]["model"])):
        model = build_model(ModelConfig(**config["model"]), len(weights["fc.bias"]))
        model.load_state_dict(weights)
        top1[name] = engine.evaluate(model.to(memory_format=torch.channels_last), val, device=torch.device("cpu"),
                                     amp_dtype=None, flip_tta=config["val"]["flip_tta"])["top1"]
    assert top1["raw"] != top1["ema"]  # else the check below could not tell the two apart
    assert record["top1_raw"] == top1["raw"] and record["top1"] == top1["ema"]


# ----------------------------------------------------------------------------- predictions.csv is not stale

FAST = ["--num-show", "1", "--classes", "1", "--pairs", "1", "--num-threads", "1", "--no-progress",
        "--device", "cpu"]


@pytest.mark.parametrize("flags, changed", [
    ([], {}),  # the same checkpoint and settings: reused
    (["--checkpoint", "model_final.pth"], {"checkpoint": "model_final.pth"}),  # another file of the same run
    (["--weights", "model"], {"weights": "model"}),  # the raw weights of the same file
    (["--res", "32"], {"res": 32}),
    (["--crop-ratio", "0.5"], {"crop_ratio": 0.5}),
    (["--flip-tta", "off"], {"flip_tta": False}),
    (["--limit", "10"], {"limit": 10, "images": 10}),
    (["--precision", "bf16"], {"precision": "bfloat16"}),
    (["--batch-size", "7"], {"batch_size": 7}),
])
def test_report_reuses_predictions_only_for_the_same_checkpoint_and_settings(built_report, tiny_run, shards_dir,
                                                                              tmp_path, capsys, flags, changed):
    saved = built_report.parent
    before = json.loads((saved / "predictions.json").read_text())
    flags = [str(tiny_run / f) if f.endswith(".pth") else f for f in flags]
    out = tmp_path / "report"
    out.mkdir()
    for name in ("predictions.csv", "predictions.json"):
        shutil.copy2(saved / name, out / name)
    capsys.readouterr()
    assert report.main([str(tiny_run), "--data", str(shards_dir), "--output", str(out), *FAST, *flags]) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "predictions.json").read_text())
    if not changed:
        assert "read back: top-1" in printed and after == before
        return
    assert "evaluated: top-1" in printed and "read back" not in printed, flags
    for key, value in changed.items():
        got = Path(after[key]).name if key == "checkpoint" else after[key]
        assert got == value and before[key] != after[key], key


def test_report_evaluates_again_when_the_data_at_the_same_path_changes(tiny_run, shards_dir, tmp_path, capsys):
    """Shards made again at the same path (other settings, other images) are other data: predictions.csv of
    the old shards must not be reported for them."""
    data = tmp_path / "shards"
    shutil.copytree(shards_dir, data)
    argv = [str(tiny_run), "--data", str(data), "--output", str(tmp_path / "report"), *FAST]
    assert report.main(argv) == 0 and report.main(argv) == 0
    assert "read back: top-1" in capsys.readouterr().out
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["settings"]["quality"] = manifest["settings"].get("quality", 90) - 1  # as a re-run with --quality
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert report.main(argv) == 0
    printed = capsys.readouterr().out
    assert "evaluated: top-1" in printed and "read back" not in printed


def test_report_evaluates_again_when_the_checkpoint_file_is_replaced(tiny_run, shards_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "metrics.jsonl", run_dir)
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    torch.save(best, run_dir / "checkpoints" / "best.pt")
    argv = [str(run_dir), "--data", str(shards_dir), *FAST]
    assert report.main(argv) == 0 and report.main(argv) == 0
    assert "read back: top-1" in capsys.readouterr().out
    best["ema"]["model"]["fc.bias"] = best["ema"]["model"]["fc.bias"] + 5 * torch.arange(10.0)  # other weights
    torch.save(best, run_dir / "checkpoints" / "best.pt")  # same path
    assert report.main(argv) == 0
    printed = capsys.readouterr().out
    assert "evaluated: top-1" in printed and "read back" not in printed
