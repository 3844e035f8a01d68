"""--label-space: a 1000-output model on a 4-class Tiny-ImageNet layout is scored in the space its own
predictions point to (folder order for one trained on the folders, ImageNet index by wnid for an ImageNet
model), says which and why, and the flag overrides it."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image

from viz import gradcam, report
from viz.datasets import match_model, open_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Sorted wnids -> folder index 0..3; their ImageNet indices are 1, 10, 281, 999 (none equal to the folder's).
WNIDS = ["n01443537", "n01530575", "n02123045", "n15075141"]  # goldfish, brambling, tabby, toilet tissue
IMAGENET_INDEX = [1, 10, 281, 999]
PER_CLASS = 2


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """Tiny-ImageNet's layout: wnids.txt, val/images/*.JPEG, val/val_annotations.txt."""
    root = tmp_path_factory.mktemp("tiny-imagenet-4")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for c, wnid in enumerate(WNIDS):
        for j in range(PER_CLASS):
            name = f"val_{c}{j}.JPEG"
            Image.new("RGB", (40, 32), (40 * c, 60, 200 - 40 * j)).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def constant_model(path, output: int) -> None:
    """A 1000-output ResNet-18 that predicts `output` for every image (fc weights 0, bias peaked there),
    saved as PyTorch's ImageNet example saves it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-10.0)
        model.fc.bias[output] = 10.0
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)


def run_gradcam(checkpoint, data, out, capsys, *flags) -> tuple[dict, str]:
    assert gradcam.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(out),
                         "--num-show", "2", "--res", "32", "--workers", "0", "--device", "cpu", "--no-progress",
                         *flags]) == 0
    return json.loads(out.with_suffix(".json").read_text()), capsys.readouterr().out


def test_a_model_trained_on_the_folders_is_scored_in_folder_order(tiny_imagenet, tmp_path, capsys):
    constant_model(tmp_path / "folder.pth.tar", output=0)  # always folder class 0 (goldfish's folder)
    listed, out = run_gradcam(tmp_path / "folder.pth.tar", tiny_imagenet / "val", tmp_path / "a.png", capsys)
    assert "label space: folder order" in out and "8 are outputs 0-3" in out and "0 the ImageNet indices" in out
    assert listed["top1"] == pytest.approx(PER_CLASS / (PER_CLASS * len(WNIDS)))  # the goldfish images are right
    listed, out = run_gradcam(tmp_path / "folder.pth.tar", tiny_imagenet / "val", tmp_path / "b.png", capsys,
                              "--label-space", "imagenet")
    assert "by wnid (ImageNet index) (--label-space imagenet)" in out and listed["top1"] == 0.0


def test_an_imagenet_model_is_scored_by_wnid(tiny_imagenet, tmp_path, capsys):
    constant_model(tmp_path / "imagenet.pth.tar", output=IMAGENET_INDEX[2])  # always tabby, ImageNet 281
    listed, out = run_gradcam(tmp_path / "imagenet.pth.tar", tiny_imagenet, tmp_path / "a.png", capsys)
    assert "label space: 4 classes mapped to the model's 1000 classes by wnid" in out
    assert "0 are outputs 0-3 and 8 the ImageNet indices" in out
    assert listed["top1"] == pytest.approx(0.25) and {r["predicted"] for r in listed["images"]} == {"tabby"}
    listed, out = run_gradcam(tmp_path / "imagenet.pth.tar", tiny_imagenet, tmp_path / "b.png", capsys,
                              "--label-space", "folder")
    assert "folder order: data class i is model output i" in out and listed["top1"] == 0.0
    assert {r["predicted"] for r in listed["images"]} == {"output 281"}


def test_report_takes_the_label_space_flag(tiny_imagenet, tmp_path, capsys):
    constant_model(tmp_path / "folder.pth.tar", output=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    common = [str(run_dir), "--data", str(tiny_imagenet), "--checkpoint", str(tmp_path / "folder.pth.tar"),
              "--res", "32", "--num-show", "1", "--classes", "1", "--pairs", "1", "--num-threads", "1",
              "--no-progress", "--device", "cpu"]
    assert report.main(common) == 0
    assert "label space: folder order" in capsys.readouterr().out
    assert json.loads((run_dir / "report" / "predictions.json").read_text())["top1"] == 0.25
    assert report.main([*common, "--label-space", "imagenet"]) == 0  # another label map: evaluated afresh
    out = capsys.readouterr().out
    assert "evaluated: top-1 0.00%" in out and "--label-space imagenet" in out


def test_auto_without_evidence_and_with_weak_evidence(tiny_imagenet):
    data = open_data(tiny_imagenet)
    assert match_model(data, 1000).label_map == tuple(IMAGENET_INDEX)  # no predictions: by wnid, as before
    assert match_model(data, 1000, argmaxes=[5, 281, 700, 3]).label_map == tuple(IMAGENET_INDEX)  # 2/4: not "nearly all"
    folder = match_model(data, 1000, argmaxes=[0, 1, 2, 3, 3, 999])
    assert folder.label_map is None and len(folder.classes) == 1000 and folder.classes[4].name == "output 4"
    with pytest.raises(gradcam.VizError, match="cannot tell which output"):
        match_model(data, 10)  # 10 outputs, no class list, nothing seen: no guess
    assert match_model(data, 10, argmaxes=[0, 1, 3, 2]).note.startswith("folder order")
    with pytest.raises(gradcam.VizError, match="too few for folder order"):
        match_model(data, 10, argmaxes=[7, 8, 9, 1])
    with pytest.raises(gradcam.VizError, match="--label-space imagenet: the 4 classes"):
        match_model(data, 10, label_space="imagenet")
