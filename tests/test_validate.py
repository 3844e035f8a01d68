"""viz.validate: on our shards it measures the trainer's top-1 of a tiny run; ImageNet-V2's class-index folders
are ImageNet-1k indices (not torchvision's sorted order); ImageNet-ReaL counts a prediction in the image's
list and leaves out images with an empty one; viz.report shows those figures when given the results."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from preprocess.sources import ClassInfo
from tests.test_predict import forced_model
from tests.test_train import metrics, run, train_cmd
from viz import report, validate
from viz.datasets import open_data
from viz.evaluate import Prediction
from viz.weights import VizError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = ["--device", "cpu", "--num-threads", "1", "--no-progress"]
# top-5 of the forced 1000-output model: tabby, goldfish, great white shark, cleaver, letter opener
FORCED = {281: 5.0, 1: 4.0, 2: 3.0, 500: 2.0, 600: 1.0}


@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory):
    """One epoch of a BlurPool ResNet-18 (flip-TTA, val 64 px, as TINY sets them)."""
    out = tmp_path_factory.mktemp("validate") / "run"
    proc = run(train_cmd(shards_dir, out, "--schedule.epochs=1", "--model.blurpool=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """A plain 1000-output state_dict (no settings stored) whose top-5 is FORCED's for every image."""
    path = tmp_path_factory.mktemp("forced") / "forced.pth"
    torch.save(forced_model(1000, FORCED).state_dict(), path)
    return path


def image(path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), (shade, 255 - shade, 90)).save(path)


def test_on_our_shards_it_measures_the_trainers_top1(tiny_run, shards_dir, capsys):
    record = metrics(tiny_run)[-1]
    assert validate.main(["--checkpoint", str(tiny_run), "--data", str(shards_dir), *CPU]) == 0
    out = capsys.readouterr().out
    assert "the same count of correct images" in out
    results = tiny_run / "validate" / f"{shards_dir.name}.json"  # default: beside the run
    numbers = json.loads(results.read_text())
    assert (numbers["top1"], numbers["top5"], numbers["images"]) == (record["top1"], record["top5"],
                                                                      record["val_images"])
    assert (numbers["res"], numbers["flip_tta"], numbers["blurpool"], numbers["settings_assumed"]) == (64, True, True,
                                                                                                      False)
    assert f"top-1 {record['top1']:.2%}" in out
    with open(results.with_suffix(".csv"), newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["top1"]) == record["top1"] and row["layout"] == "shards" and row["real_top1"] == ""
    predictions = results.with_name(f"{results.stem}_predictions.csv")
    assert sum(1 for _ in open(predictions)) == record["val_images"] + 1


def test_imagenet_v2_folders_are_imagenet_indices(forced, tmp_path, capsys):
    v2 = tmp_path / "imagenetv2-matched-frequency-format-val"
    counts = {3: 2, 17: 1, 281: 3}  # sorted as strings: "17" < "281" < "3" (torchvision's order: 0, 1, 2)
    for index, n in counts.items():
        for j in range(n):
            image(v2 / str(index) / f"{index}_{j}.jpeg", 40 * j + index % 200)
    data = open_data(v2)
    assert data.layout == "imagenet-v2" and len(data.classes) == 1000 and data.classes[281].name == "tabby"
    assert sorted(label for _, label, _ in data.files) == [3, 3, 17, 281, 281, 281]
    assert all(path.split("/")[-2] == str(label) for _, label, path in data.files)
    image(tmp_path / "padded" / "007" / "a.jpeg", 1)  # not an index as written: an ImageFolder class
    image(tmp_path / "padded" / "8" / "b.jpeg", 2)
    assert open_data(tmp_path / "padded").layout == "imagefolder"

    out = tmp_path / "v2.json"
    assert validate.main(["--checkpoint", str(forced), "--data", str(v2), "--output", str(out), "--res", "32",
                          *CPU]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["layout"] == "imagenet-v2" and numbers["dataset"].startswith("ImageNet-V2")
    assert numbers["top1"] == pytest.approx(3 / 6)  # the folder 281 (tabby) images are right
    assert numbers["top5"] == pytest.approx(3 / 6)  # 3 and 17 are not among the forced five
    with open(out.with_name("v2_predictions.csv"), newline="") as f:
        labels = {row["key"]: int(row["label"]) for row in csv.DictReader(f)}
    assert labels == {key: int(key.split("_")[0]) for key in labels}
    assert "ImageNet-V2 layout" in capsys.readouterr().out


@pytest.fixture
def val_folder(tmp_path):
    """ImageNet validation files by their own names, in an ImageFolder: 1-3 tabby (281), 4-6 goldfish (1)."""
    root = tmp_path / "imagenet-val"
    for n in range(1, 7):
        wnid = "n02123045" if n <= 3 else "n01443537"
        image(root / wnid / f"ILSVRC2012_val_{n:08d}.JPEG", 30 * n)
    return root


# lists of images 1..6 (the 7th is no image of ours): right / left out / right / top-5 only / right / top-5 only
REAL = [[281], [], [1, 281], [1], [281, 285], [2], [0]]


def test_real_labels_count_the_list_and_leave_out_empty_ones(forced, val_folder, tmp_path, capsys):
    (tmp_path / "real.json").write_text(json.dumps(REAL))
    out = tmp_path / "real.json.results.json"
    assert validate.main(["--checkpoint", str(forced), "--data", str(val_folder), "--real-labels",
                          str(tmp_path / "real.json"), "--output", str(out), "--res", "32", *CPU]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["top1"] == pytest.approx(0.5)  # the three tabby folder images
    assert (numbers["real_top1"], numbers["real_top5"]) == (pytest.approx(3 / 5), pytest.approx(1.0))
    assert (numbers["real_images"], numbers["real_left_out"], numbers["real_lists"]) == (5, 1, 7)
    printed = capsys.readouterr().out
    assert "ImageNet-ReaL: top-1 60.00%, top-5 100.00% on 5 images (1 with an empty label list left out" in printed
    assert "holds 7 lists, not ReaL's 50,000" in printed

    (tmp_path / "short.json").write_text(json.dumps(REAL[:4]))
    assert validate.main(["--checkpoint", str(forced), "--data", str(val_folder), "--real-labels",
                          str(tmp_path / "short.json"), "--output", str(out), "--res", "32", *CPU]) == 2
    assert "holds 4 lists, 2 images need more (e.g. 'ILSVRC2012_val_00000005' needs list 5)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([[1], [1000]]))
    assert validate.main(["--checkpoint", str(forced), "--data", str(val_folder), "--real-labels",
                          str(tmp_path / "bad.json"), *CPU]) == 2
    assert "entry 1 is [1000], expected a list of class indices 0-999" in capsys.readouterr().err
    (val_folder / "n01443537" / "ILSVRC2012_val_00000006.JPEG").rename(val_folder / "n01443537" / "photo.JPEG")
    assert validate.main(["--checkpoint", str(forced), "--data", str(val_folder), "--real-labels",
                          str(tmp_path / "real.json"), "--output", str(out), "--res", "32", *CPU]) == 2
    assert "1 of 6 images are not named like ILSVRC2012_val_00000001 (e.g. 'photo')" in capsys.readouterr().err


def test_real_maps_outputs_to_imagenet_by_wnid():
    """A 6-output model whose outputs are ImageNet classes in another order: output 0 is tabby (281)."""
    classes = [ClassInfo("n02123045", "tabby"), ClassInfo("n01443537", "goldfish")] + [
        ClassInfo(None, f"output {i}") for i in range(2, 6)]
    predictions = [Prediction(0, "ILSVRC2012_val_00000001_n02123045", 0, 0, 0.9, 0.9, (0, 1, 2, 3, 4)),
                   Prediction(1, "ILSVRC2012_val_00000002_n01443537", 1, 0, 0.9, 0.1, (0, 2, 3, 4, 5))]
    got = validate.real_accuracy(predictions, classes, [[281], [1]], outputs=6)
    assert (got["real_top1"], got["real_top5"], got["real_images"]) == (0.5, 0.5, 2)
    assert validate.real_accuracy(predictions, classes, [[281], [1]], outputs=5)["real_top5"] is None
    with pytest.raises(VizError, match="not ImageNet-1k wnids"):
        validate.real_accuracy(predictions, [ClassInfo(None, "x")] * 6, [[281], [1]], outputs=6)


def test_report_shows_the_extra_results(tiny_run, shards_dir, forced, val_folder, tmp_path, capsys):
    (tmp_path / "real.json").write_text(json.dumps(REAL))
    extra = tmp_path / "extra.json"
    assert validate.main(["--checkpoint", str(forced), "--data", str(val_folder), "--real-labels",
                          str(tmp_path / "real.json"), "--output", str(extra), "--res", "32", *CPU]) == 0
    common = [str(tiny_run), "--data", str(shards_dir), "--output", str(tmp_path / "report"), "--num-show", "1",
              "--classes", "1", "--pairs", "1", "--num-threads", "1", "--no-progress", "--device", "cpu"]
    assert report.main([*common, "--extra-results", str(extra)]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Other validation sets" in page and "ImageFolder: imagenet-val" in page
    assert "60.00% (5 images)" in page and "50.00%" in page
    assert report.main([*common, "--extra-results", str(tmp_path / "real.json")]) == 2
    assert "not a results file of python -m viz.validate" in capsys.readouterr().err
