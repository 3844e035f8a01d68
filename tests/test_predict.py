"""viz.predict: one CSV row per image with the top-5 the model file's own settings give; a constructed model
whose classifier bias decides its outputs makes those rows known in advance."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torchvision
from PIL import Image

from train import artifact
from viz import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIAS = {7: 4.0, 3: 3.0, 9: 2.0, 0: 1.0, 5: 0.0}  # class -> logit; every other class -10
CLASSES = [{"wnid": f"n{i:08d}", "name": f"class {chr(97 + i)}"} for i in range(10)]


def forced_model(num_classes: int, bias: dict[int, float]) -> torch.nn.Module:
    """A ResNet-18 whose logits are `bias` for any image (fc weights 0)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-10.0)
        for c, value in bias.items():
            model.fc.bias[c] = value
    return model.eval()


def expected_top5(num_classes: int, bias: dict[int, float]) -> list[tuple[int, float]]:
    logits = torch.full((num_classes,), -10.0)
    for c, value in bias.items():
        logits[c] = value
    probs = torch.softmax(logits, 0)
    return [(c, float(probs[c])) for c in sorted(bias, key=bias.get, reverse=True)]


@pytest.fixture
def images(tmp_path):
    """Synthetic JPEGs of several sizes and modes in a folder tree, plus a broken file and a non-image."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "b.jpg")
    Image.new("L", (50, 90), 128).save(folder / "a.JPEG")  # grayscale
    Image.new("RGB", (300, 200), (20, 90, 200)).save(folder / "sub" / "c.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_rows_are_the_forced_classes_with_the_files_names(images, tmp_path, capsys):
    model = forced_model(10, BIAS)
    card = artifact.card_from_config({"val": {"res": 32, "crop_ratio": 0.875, "flip_tta": True, "batch_size": 2}},
                                     architecture="resnet18", num_classes=10, classes=CLASSES)
    artifact.save(tmp_path / "model", model, card)
    out = tmp_path / "out" / "predictions.csv"
    assert predict.main(["--checkpoint", str(tmp_path / "model" / artifact.MODEL_FILE), "--data", str(images),
                         "--output", str(out), "--device", "cpu", "--num-threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "val 32 px, crop 0.875, flip-TTA on" in printed and "the model file's class list" in printed
    assert "1 unreadable files skipped" in printed
    columns, rows = read_rows(out)
    assert columns == predict.columns(5)
    # sorted, recursive, images only; the broken JPEG is skipped and counted, never a row
    assert [r["path"] for r in rows] == [str(images / "a.JPEG"), str(images / "b.jpg"), str(images / "sub" / "c.png")]
    for row in rows:
        for rank, (c, prob) in enumerate(expected_top5(10, BIAS), 1):
            assert int(row[f"class{rank}"]) == c
            assert (row[f"wnid{rank}"], row[f"name{rank}"]) == (CLASSES[c]["wnid"], CLASSES[c]["name"])
            assert float(row[f"prob{rank}"]) == pytest.approx(prob, rel=1e-5)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["images"] == 3 and summary["unreadable_files"] == [str(images / "broken.jpg")]
    assert (summary["res"], summary["flip_tta"], summary["batch_size"]) == (32, True, 2)


def test_a_plain_imagenet_state_dict_gets_imagenet_names_and_says_what_it_assumed(images, tmp_path, capsys):
    bias = {281: 5.0, 1: 4.0}  # tabby, goldfish; then 998 classes tied at -10
    torch.save(forced_model(1000, bias).state_dict(), tmp_path / "plain.pth")
    out = tmp_path / "p.csv"
    files = [str(images / "b.jpg"), str(images / "a.JPEG"), str(images / "b.jpg")]  # as given, each once
    assert predict.main(["--checkpoint", str(tmp_path / "plain.pth"), "--data", *files, "--output", str(out),
                         "--res", "32", "--device", "cpu", "--num-threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "no settings stored with" in printed and "assuming resnet18 without BlurPool" in printed
    assert "assumed ImageNet-1k's 1000 classes" in printed
    _, rows = read_rows(out)
    assert [r["path"] for r in rows] == files[:2]
    assert [(r["class1"], r["wnid1"], r["name1"]) for r in rows] == [("281", "n02123045", "tabby")] * 2
    assert [(r["class2"], r["name2"]) for r in rows] == [("1", "goldfish")] * 2


def test_bad_requests_name_the_flag(images, tmp_path, capsys):
    torch.save(forced_model(10, BIAS).state_dict(), tmp_path / "m.pth")
    common = ["--checkpoint", str(tmp_path / "m.pth"), "--device", "cpu", "--no-progress"]
    assert predict.main([*common, "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "x.csv")]) == 2
    assert "--data " + str(tmp_path / "missing") + ": no such file or directory" in capsys.readouterr().err
    assert predict.main([*common, "--data", str(images), "--output", str(tmp_path / "x.txt")]) == 2
    assert "expected a .csv file name" in capsys.readouterr().err
    assert predict.main([*common, "--data", str(images / "broken.jpg"), "--output", str(tmp_path / "x.csv"),
                         "--res", "32"]) == 2
    assert "no readable images" in capsys.readouterr().err
