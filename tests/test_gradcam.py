"""viz.gradcam: CAMs find a planted patch, mistakes are selected and ordered right, the grid has the
computed size, old flags equal new ones, and bad checkpoints / data give one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from torch import nn

from viz import evaluate as evaluation, gradcam, loader, render


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------- Grad-CAM finds the evidence

SIDE = 32  # px, patch-test image side
PATCH = 8  # px, patch side


def patch_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images, each with a green decoy square; label 1 ones also carry a red square.
    Returns images, labels and the top-left corner of the red square (label 1) as (y, x)."""
    images = torch.rand(n, 3, SIDE, SIDE, generator=generator) * 0.5
    labels = torch.randint(0, 2, (n,), generator=generator)
    corners = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        while True:  # red and green squares must not overlap
            red, green = torch.randint(0, SIDE - PATCH + 1, (2, 2), generator=generator)
            if (red - green).abs().max() >= PATCH:
                break
        images[i, :, green[0]:green[0] + PATCH, green[1]:green[1] + PATCH] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]
        if labels[i] == 1:
            images[i, :, red[0]:red[0] + PATCH, red[1]:red[1] + PATCH] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
            corners[i] = red
    return images, labels, corners


class PatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_cam_maximum_lies_in_the_planted_patch():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = PatchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        images, labels, _ = patch_images(32, generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels, corners = patch_images(200, generator)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95, "the model must have learned the patch for the CAM check to mean anything"

    positive = labels == 1
    cams = gradcam.compute_cams(model, model.features[-1], images[positive], [1] * int(positive.sum()))
    assert cams.shape == (int(positive.sum()), SIDE, SIDE)
    hits = 0
    for cam, (y0, x0) in zip(cams, corners[positive].tolist()):
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        hits += y0 - 1 <= y <= y0 + PATCH and x0 - 1 <= x <= x0 + PATCH  # 1 px slack for the 4 px feature grid
    assert hits / len(cams) >= 0.8, f"CAM peak inside the patch for only {hits}/{len(cams)} images"


# ----------------------------------------------------------------------------- selection with a known classifier

GREY_STEP = 20  # grey level per image id: image i is a solid grey of 20 * i


class TableNet(nn.Module):
    """Logits looked up in a fixed table by image id, read back from the (normalised) grey level."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)  # a target layer for Grad-CAM
        self.register_buffer("table", table)

    def forward(self, x):
        grey = x[:, 0].mean(dim=(1, 2)) * gradcam.IMAGENET_STD[0] + gradcam.IMAGENET_MEAN[0]
        ids = torch.round(grey * 255 / GREY_STEP).long()
        return self.table[ids] + 0 * self.conv(x).mean(dim=(1, 2, 3))[:, None]


# image id -> (true class, predicted class, logit of the prediction; the others are 0)
CASES = [(0, 0, 3.0), (1, 2, 2.0), (2, 2, 1.0), (3, 0, 5.0), (0, 3, 0.5), (1, 1, 4.0), (2, 1, 3.5), (3, 3, 1.5),
         (0, 1, 1.2)]


def write_grey_folder(root, cases) -> None:
    """ImageFolder val/<class>/img_<id>.png with solid grey images encoding the id."""
    for i, (label, _, _) in enumerate(cases):
        folder = root / "val" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (GREY_STEP * i,) * 3).save(folder / f"img_{i:02d}.png")


def table_for(cases) -> torch.Tensor:
    table = torch.zeros(len(cases), 4)
    for i, (_, predicted, logit) in enumerate(cases):
        table[i, predicted] = logit
    return table


def softmax_top(logit: float) -> float:
    return float(np.exp(logit) / (np.exp(logit) + 3))


def run_table(tmp_path, cases, **kwargs):
    write_grey_folder(tmp_path, cases)
    data = gradcam.open_data(tmp_path)
    assert data.layout == "imagefolder" and [c.name for c in data.classes] == ["c0", "c1", "c2", "c3"]
    model = TableNet(table_for(cases))
    png = tmp_path / "out" / "grid.png"
    png.parent.mkdir()
    report = gradcam.explain(model, model.conv, data, png, res=24, progress=False, **kwargs)
    return report, png


def test_selects_exactly_the_mistakes_by_confidence(tmp_path):
    (tmp_path / "val" / "c0").mkdir(parents=True)
    (tmp_path / "val" / "c0" / "broken.png").write_bytes(b"not an image")  # skipped and counted
    report, png = run_table(tmp_path, CASES, num_show=10)
    assert report.skipped == 1
    wrong = sorted((i for i, (t, p, _) in enumerate(CASES) if t != p), key=lambda i: -CASES[i][2])
    assert [p.key for p in report.selected] == [f"img_{i:02d}" for i in wrong]
    assert report.mistakes == len(wrong) and report.evaluated == len(CASES)
    assert report.top1 == pytest.approx(1 - len(wrong) / len(CASES))
    listed = json.loads(png.with_suffix(".json").read_text())["images"]
    assert [r["key"] for r in listed] == [f"img_{i:02d}" for i in wrong]
    assert [(r["true"], r["predicted"]) for r in listed] == [(f"c{CASES[i][0]}", f"c{CASES[i][1]}") for i in wrong]
    assert [r["confidence"] for r in listed] == pytest.approx([softmax_top(CASES[i][2]) for i in wrong], abs=1e-5)
    with png.with_suffix(".csv").open() as f:
        assert [r["key"] for r in csv.DictReader(f)] == [r["key"] for r in listed]
    with Image.open(png) as image:
        assert image.size == render.grid_size(len(wrong))
        for row, i in enumerate(wrong):  # row k shows the k-th mistake: its solid grey fills the first cell
            top = render.HEADER_H + row * render.ROW_H + render.TITLE_H
            centre = image.getpixel((render.PAD + render.CELL // 2, top + render.CELL // 2))
            assert centre == (GREY_STEP * i,) * 3


def test_num_show_random_and_class_selection(tmp_path):
    predictions = [gradcam.Prediction(i, f"k{i}", t, p, softmax_top(s), 0.1) for i, (t, p, s) in enumerate(CASES)]
    wrong = [p for p in predictions if p.label != p.predicted]
    top2 = gradcam.select_mistakes(predictions, 2)
    assert [p.key for p in top2] == ["k3", "k6"]
    drawn = gradcam.select_mistakes(predictions, 3, "random", seed=1)
    assert len(drawn) == 3 and set(drawn) <= set(wrong)
    assert [p.confidence for p in drawn] == sorted((p.confidence for p in drawn), reverse=True)
    assert drawn == gradcam.select_mistakes(predictions, 3, "random", seed=1)
    classes = [gradcam.ClassInfo(None, f"c{c}") for c in range(4)]
    c0 = gradcam.find_class("C0", classes)
    assert [p.key for p in gradcam.select_mistakes(predictions, 10, class_index=c0)] == ["k8", "k4"]
    with pytest.raises(gradcam.VizError, match="did you mean"):
        gradcam.find_class("c1x", classes)


def test_no_mistakes_writes_empty_lists(tmp_path):
    right = [(t, t, 1.0 + t) for t, _, _ in CASES]
    report, png = run_table(tmp_path, right)
    assert report.selected == [] and report.top1 == 1.0
    assert json.loads(png.with_suffix(".json").read_text())["images"] == []
    assert png.with_suffix(".csv").read_text().splitlines() == [
        "rank,key,true,true_index,predicted,predicted_index,confidence,true_prob"]
    with Image.open(png) as image:
        assert image.size == render.grid_size(0)


# ----------------------------------------------------------------------------- layout

def test_grid_size_from_layout_constants():
    rows = [render.GridRow(Image.new("RGB", (64, 64), (200, 0, 0)), np.random.rand(64, 64), np.zeros((64, 64)), r,
                           f"key{r}", "a very long true class name that cannot fit into one cell title",
                           "predicted", 0.9, 0.01) for r in range(3)]
    image = render.render_grid(rows, ("header",))
    cell, pad = render.CELL, render.PAD
    assert image.size == (pad + 3 * (cell + pad), render.HEADER_H + 3 * (render.TITLE_H + cell + pad) + pad)
    face = render.font()
    title = render.fit_text(rows[0].true_name, cell, face)
    assert title.endswith("...") and face.getlength(title) <= cell


def test_grid_titles_draw_accented_and_cjk_names():
    from viz import fonts

    face = render.font()

    def ink(text: str) -> bytes:
        image = Image.new("L", (40, 30))
        ImageDraw.Draw(image).text((5, 5), text, font=face, fill=255)
        return image.tobytes()

    box = ink("\U0010fffd")  # a private-use character no font has: the missing-glyph box
    assert ink("é") != box and ink("Æ") != box
    if fonts.cjk_family():
        assert ink("中") != box


# ----------------------------------------------------------------------------- data layouts

def _jpeg(path, colour=(90, 120, 150)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path)


def test_tiny_imagenet_val_maps_to_imagenet_classes(tmp_path):
    wnids = ["n01443537", "n01440764", "n01484850"]  # goldfish, tench, great white shark
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, wnid in enumerate(wnids):
        _jpeg(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for path in (tmp_path, tmp_path / "val"):
        data = gradcam.open_data(path)
        assert data.layout == "tiny-imagenet" and data.size == 3
        assert [c.name for c in data.classes] == ["tench", "goldfish", "great white shark"]  # sorted wnids
    mapped = gradcam.match_model(data, 1000)
    assert mapped.label_map == (0, 1, 2) and mapped.classes[999].name == "toilet tissue"
    batches = loader.batches(mapped, res=16, crop_ratio=0.875, batch_size=8)
    labels = {key: label for batch in batches for key, label in zip(batch.keys, batch.labels)}
    assert labels == {"val_0": 1, "val_1": 0, "val_2": 2}
    with pytest.raises(gradcam.VizError, match="has 3 classes, the checkpoint 10"):
        gradcam.match_model(data, 10)


# Classes whose ImageNet indices are not 0..n-1, so that an identity map gives wrong labels.
SCATTERED = {"n15075141": 999, "n02123045": 281, "n01443537": 1, "n01530575": 10}  # toilet tissue, tabby, goldfish, brambling


def _mapped_labels(data) -> dict[str, int]:
    mapped = gradcam.match_model(data, 1000)
    assert mapped.label_map == (1, 10, 281, 999)  # the dataset's classes are its sorted wnids
    assert [mapped.classes[i].name for i in mapped.label_map] == ["goldfish", "brambling", "tabby", "toilet tissue"]
    batches = loader.batches(mapped, res=16, crop_ratio=0.875, batch_size=3)
    return {key: label for batch in batches for key, label in zip(batch.keys, batch.labels)}


def test_tiny_imagenet_labels_are_the_imagenet_indices_of_their_wnids(tmp_path):
    (tmp_path / "wnids.txt").write_text("\n".join(SCATTERED) + "\n")
    lines = []
    for i, wnid in enumerate(SCATTERED):
        _jpeg(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    labels = _mapped_labels(gradcam.open_data(tmp_path / "val"))
    assert labels == {f"val_{i}": index for i, index in enumerate(SCATTERED.values())}


def test_imagefolder_labels_are_the_imagenet_indices_of_their_wnids(tmp_path):
    for wnid in SCATTERED:
        _jpeg(tmp_path / "val" / wnid / f"{wnid}_a.JPEG")
    labels = _mapped_labels(gradcam.open_data(tmp_path))
    assert labels == {f"{wnid}_a": index for wnid, index in SCATTERED.items()}


def test_imagefolder_uses_the_train_class_list(tmp_path):
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    _jpeg(tmp_path / "val" / "n01484850" / "a.JPEG")
    data = gradcam.open_data(tmp_path)
    assert len(data.classes) == 3 and data.files[0][:2] == ("a", 2)


def test_unknown_layout_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(gradcam.VizError, match="not a validation set"):
        gradcam.open_data(tmp_path)


# ----------------------------------------------------------------------------- CLI end to end

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random-init ResNet-50 (10 classes): as a plain state_dict and as the trainer's checkpoint."""
    out = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    state = torchvision.models.resnet50(num_classes=10).state_dict()
    torch.save(state, out / "model_final.pth")
    trainer = {"model": {f"module._orig_mod.{k}": v for k, v in state.items()}, "ema": None, "epoch": 3,
               "config": {"model": {"arch": "resnet50", "blurpool": True}, "val": {"res": 64, "crop_ratio": 0.875, "flip_tta": True}}}
    torch.save(trainer, out / "best.pt")
    return out


COMMON = ["--limit", "8", "--device", "cpu", "--no-progress"]


def test_old_flags_give_the_same_output(checkpoints, shards_dir, tmp_path, capsys):
    new, old = tmp_path / "new" / "grid.png", tmp_path / "old" / "grid.png"
    assert gradcam.main(["--checkpoint", str(checkpoints / "model_final.pth"), "--data", str(shards_dir),
                         "--output", str(new), "--num-show", "3", "--num-classes", "10", "--res", "64",
                         "--workers", "0", *COMMON]) == 0
    assert gradcam.main(["--checkpoint_path", str(checkpoints / "model_final.pth"), "--validation_img_path",
                         str(shards_dir), "--output_path", str(old), "--num_show", "3", "--num_classes", "10",
                         "--res", "64", "--workers", "0", *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed
    wrote = [line for line in printed.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 2 and all(Path(p).is_file() for line in wrote for p in line[6:].split(", ")), wrote
    for suffix in (".png", ".json", ".csv"):
        assert new.with_suffix(suffix).read_bytes() == old.with_suffix(suffix).read_bytes(), suffix
    listed = json.loads(new.with_suffix(".json").read_text())
    assert listed["evaluated"] == 8 and listed["res"] == 64
    with Image.open(new) as image:
        assert image.size == render.grid_size(len(listed["images"]))
    assert 1 <= len(listed["images"]) <= 3


def test_trainer_checkpoint_and_loader_workers(checkpoints, shards_dir, tmp_path):
    """best.pt (prefixed keys; BlurPool and val res from its config) decoded by 2 workers selects what
    model_final.pth with --blurpool on --res 64 decoded in-process does."""
    plain, trainer = tmp_path / "plain.png", tmp_path / "trainer.png"
    assert gradcam.main(["--checkpoint", str(checkpoints / "model_final.pth"), "--data", str(shards_dir),
                         "--output", str(plain), "--num-show", "2", "--res", "64", "--workers", "0",
                         "--blurpool", "on", "--flip-tta", "on", *COMMON]) == 0
    assert gradcam.main(["--checkpoint", str(checkpoints / "best.pt"), "--data", str(shards_dir / "val"),
                         "--output", str(trainer), "--num-show", "2", "--workers", "2", *COMMON]) == 0
    plain_list, trainer_list = (json.loads(p.with_suffix(".json").read_text()) for p in (plain, trainer))
    assert trainer_list["res"] == 64 and trainer_list["blurpool"] and plain_list["blurpool"]
    assert trainer_list["flip_tta"] and plain_list["flip_tta"]  # from best.pt's config, as the trainer evaluated
    fields = ("key", "true", "predicted")
    assert [[r[f] for f in fields] for r in trainer_list["images"]] == [[r[f] for f in fields] for r in plain_list["images"]]
    assert [r["confidence"] for r in trainer_list["images"]] == pytest.approx([r["confidence"] for r in plain_list["images"]])


def test_checkpoint_formats(checkpoints, tmp_path):
    trainer = gradcam.load_model(checkpoints / "best.pt")
    assert trainer.blurpool and trainer.weights == "model" and gradcam.val_settings(trainer.config) == (64, 0.875)
    assert any(type(m).__name__ == "BlurConv2d" for m in trainer.model.modules())
    plain = gradcam.load_model(checkpoints / "model_final.pth")
    assert (plain.arch, plain.num_classes, plain.blurpool, plain.config) == ("resnet50", 10, False, None)

    run_dir = tmp_path / "run"  # model_final.pth beside the run's config.yaml: BlurPool as the run had it
    run_dir.mkdir()
    (run_dir / "model_final.pth").symlink_to(checkpoints / "model_final.pth")
    (run_dir / "config.yaml").write_text("# resolved config\nmodel:\n  blurpool: true\nval:\n  res: 96\n")
    in_run = gradcam.load_model(run_dir / "model_final.pth")
    assert in_run.blurpool and gradcam.val_settings(in_run.config) == (96, 0.875)
    assert not gradcam.load_model(run_dir / "model_final.pth", blurpool=False).blurpool

    state = torchvision.models.resnet18(num_classes=3).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state, "ema": {"model": ema, "updates": 5}, "config": {}}, tmp_path / "last.pt")
    loaded = gradcam.load_model(tmp_path / "last.pt")
    assert (loaded.arch, loaded.num_classes, loaded.weights) == ("resnet18", 3, "ema")
    assert torch.equal(loaded.model.fc.bias, ema["fc.bias"])


def _one_line_error(capsys, argv) -> str:
    assert gradcam.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(checkpoints, shards_dir, tmp_path, capsys):
    ckpt, out = str(checkpoints / "model_final.pth"), str(tmp_path / "x.png")
    err = _one_line_error(capsys, ["--checkpoint", ckpt, "--data", str(shards_dir), "--output", out,
                                   "--num-classes", "1000"])
    assert ckpt in err and "10 classes" in err
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "nope.pth"), "--data", str(shards_dir),
                                   "--output", out])
    assert "nope.pth: no such file" in err
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "text.pth: not a weights-only" in _one_line_error(
        capsys, ["--checkpoint", str(tmp_path / "text.pth"), "--data", str(shards_dir), "--output", out])
    assert "missing: no such directory" in _one_line_error(
        capsys, ["--checkpoint", ckpt, "--data", str(tmp_path / "missing"), "--output", out])
    assert "not a validation set" in _one_line_error(
        capsys, ["--checkpoint", ckpt, "--data", str(tmp_path), "--output", out])
    assert "no such class" in _one_line_error(
        capsys, ["--checkpoint", ckpt, "--data", str(shards_dir), "--output", out, "--select", "class=zebra"])
    assert not (tmp_path / "x.png").exists()


def test_class_count_of_checkpoint_and_data_must_agree(checkpoints, shards_dir, tmp_path, capsys):
    state = torch.load(checkpoints / "model_final.pth", weights_only=True)
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:5], state["fc.bias"][:5]
    torch.save({"state_dict": state}, tmp_path / "model_best.pth.tar")
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "model_best.pth.tar"), "--data", str(shards_dir),
                                   "--output", str(tmp_path / "x.png")])
    assert "has 10 classes, the checkpoint 5" in err


class _LeftHalfScorer(torch.nn.Module):
    """Logits from the mean of the image's left half per channel: a mirror changes them."""

    def forward(self, images):
        left = images[..., : images.shape[-1] // 2].mean(dim=(2, 3))
        return torch.cat([left, -left, 2 * left, -2 * left], dim=1)[:, :10]  # the fixture's 10 classes


def test_flip_averaging_uses_the_mirror(shards_dir):
    data = gradcam.open_data(shards_dir)
    batches = list(loader.batches(data, res=64, crop_ratio=0.875, batch_size=16, limit=16))
    model, device = _LeftHalfScorer(), torch.device("cpu")
    plain = evaluation.predict(model, batches, device=device, progress=False).predictions
    flipped = evaluation.predict(model, batches, device=device, progress=False, flip=True).predictions
    images = torch.cat([b.images for b in batches])
    both = (model(images) + model(torch.flip(images, dims=[3]))) / 2  # = logits of the mean of both halves
    assert [p.confidence for p in flipped] == pytest.approx(torch.softmax(both, 1).max(1).values.tolist(), abs=1e-6)
    assert [p.confidence for p in flipped] != pytest.approx([p.confidence for p in plain], abs=1e-6)
    assert gradcam.flip_setting({"val": {"flip_tta": True}}) and not gradcam.flip_setting(None)
