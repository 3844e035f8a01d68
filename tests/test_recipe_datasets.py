"""viz.datasets by its rules, on folders a few bytes large: the Tiny-ImageNet annotation format (tabs, blank
lines, line numbers in errors, where the class list comes from), ImageFolder's unknown classes, the class
names a shard manifest gives, and when --label-space auto needs the model's predictions.
(Written to kill the mutants that `make mutation MUTATE=datasets` found alive; docs/TESTING.md.)"""

from __future__ import annotations

import pytest
from PIL import Image

from preprocess.sources import ClassInfo
from viz import datasets
from viz.datasets import ValData, needs_evidence, open_data
from viz.weights import VizError


def _jpeg(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (90, 120, 150)).save(path)


def tiny(root, lines: list[str], images: list[str], wnids: list[str] | None = None, subfolder: bool = True):
    val = root / "val"
    (val / "images" if subfolder else val).mkdir(parents=True)
    for name in images:
        _jpeg((val / "images" if subfolder else val) / name)
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    if wnids is not None:
        (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return val


def test_tiny_annotations_split_on_tabs_and_skip_blank_lines(tmp_path):
    val = tiny(tmp_path, ["a b.JPEG\tn01443537", "", "c.JPEG\tn01440764\t0\t0\t5\t5", "   ", "d.JPEG\tn01443537"],
               ["a b.JPEG", "c.JPEG", "d.JPEG"], wnids=["n01443537", "n01440764"])
    data = open_data(val)
    assert data.layout == "tiny-imagenet" and data.path == str(val) and data.size == 3
    assert sorted((key, label) for key, label, _ in data.files) == [("a_b", 1), ("c", 0), ("d", 1)]
    assert {path for _, _, path in data.files} == {str(val / "images" / n) for n in ("a b.JPEG", "c.JPEG", "d.JPEG")}


def test_tiny_annotation_errors_name_the_line(tmp_path):
    val = tiny(tmp_path, ["a.JPEG\tn01443537", "", "broken-line-without-a-tab"], ["a.JPEG"])
    with pytest.raises(VizError, match=r"val_annotations.txt:3: expected '<file>\\t<wnid>...', got "
                                       r"'broken-line-without-a-tab'"):
        open_data(val)


def test_tiny_class_list_from_wnids_txt_then_train_then_the_annotations(tmp_path):
    lines, images = ["a.JPEG\tn01443537", "b.JPEG\tn01530575"], ["a.JPEG", "b.JPEG"]
    val = tiny(tmp_path / "listed", lines, images, wnids=["n01530575", "n01443537", "n15075141"])
    assert [c.wnid for c in open_data(val).classes] == ["n01443537", "n01530575", "n15075141"]  # sorted
    val = tiny(tmp_path / "trained", lines, images)
    for wnid in ("n01530575", "n01443537", "n02123045"):
        (tmp_path / "trained" / "train" / wnid).mkdir(parents=True)
    (tmp_path / "trained" / "train" / "notes.txt").write_text("not a class")
    assert [c.wnid for c in open_data(val).classes] == ["n01443537", "n01530575", "n02123045"]
    val = tiny(tmp_path / "bare", lines, images)
    data = open_data(val)
    assert [c.wnid for c in data.classes] == ["n01443537", "n01530575"]
    assert [c.name for c in data.classes] == ["goldfish", "brambling"]


def test_tiny_images_beside_the_annotations_and_missing_ones(tmp_path):
    val = tiny(tmp_path / "flat", ["a.JPEG\tn01443537", "gone.JPEG\tn01443537"], ["a.JPEG"], subfolder=False)
    data = open_data(val)
    assert data.size == 1 and data.files[0][2] == str(val / "a.JPEG")
    val = tiny(tmp_path / "none", ["gone.JPEG\tn01443537"], [])
    with pytest.raises(VizError, match=r"images: none of the images listed in .*val_annotations.txt exist"):
        open_data(val)


def test_tiny_class_outside_wnids_txt_is_an_error(tmp_path):
    val = tiny(tmp_path, ["a.JPEG\tn01443537", "b.JPEG\tn99999999"], ["a.JPEG", "b.JPEG"], wnids=["n01443537"])
    with pytest.raises(VizError, match=rf"class n99999999 of b.JPEG is not in {tmp_path / 'wnids.txt'}$"):
        open_data(val)


def test_imagefolder_path_and_unknown_class_folder(tmp_path):
    for wnid in ("n01443537", "n01530575"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    _jpeg(tmp_path / "val" / "n01443537" / "a.JPEG")
    data = open_data(tmp_path)
    assert data.layout == "imagefolder" and data.path == str(tmp_path / "val") and len(data.classes) == 2
    _jpeg(tmp_path / "val" / "n15075141" / "b.JPEG")
    _jpeg(tmp_path / "val" / "n02123045" / "c.JPEG")
    with pytest.raises(VizError, match=rf"--data {tmp_path / 'val' / 'n02123045'}: class folder not among the 2 "
                                       rf"classes of {tmp_path / 'train'}"):
        open_data(tmp_path)


def test_shard_classes_fall_back_from_name_to_wnid_to_index(tmp_path, monkeypatch):
    manifest = {"classes": [{"index": 2, "wnid": "n01530575", "name": "brambling"}, {"index": 0, "wnid": "n01443537"},
                            {"index": 1}], "splits": {"val": {}}}
    monkeypatch.setattr(datasets, "load_manifest", lambda root: manifest)
    monkeypatch.setattr(datasets, "split_size", lambda m, split: 7)
    data = open_data_shards(tmp_path)
    assert data.classes == (ClassInfo("n01443537", "n01443537"), ClassInfo(None, "1"),
                            ClassInfo("n01530575", "brambling"))
    assert (data.layout, data.path, data.size) == ("shards", str(tmp_path), 7)
    manifest["splits"] = {"train": {}}
    with pytest.raises(VizError, match=rf"--data {tmp_path}: manifest.json lists no 'val' split"):
        open_data_shards(tmp_path)
    del manifest["splits"]
    with pytest.raises(VizError, match="lists no 'val' split"):
        open_data_shards(tmp_path)


def open_data_shards(root) -> ValData:
    (root / "manifest.json").write_text("{}")
    return open_data(root)


def _data(*wnids: str | None) -> ValData:
    return ValData("imagefolder", "x", tuple(ClassInfo(w, w or f"c{i}") for i, w in enumerate(wnids)), 0)


def test_needs_evidence_only_when_folder_order_and_wnid_index_disagree():
    assert not needs_evidence(_data("n01440764", "n01443537", "n01484850"), 1000)  # ImageNet 0, 1, 2: agree
    assert needs_evidence(_data("n01443537", "n01530575"), 1000)  # ImageNet 1, 10
    assert needs_evidence(_data(None, None), 1000)  # no wnids: only the predictions can tell
    assert needs_evidence(_data("n01440764", "n01443537"), 5)  # 5 outputs and no class list: no wnid map
    assert not needs_evidence(_data(None, None), 2) and not needs_evidence(_data(None, None, None), 2)  # k >= outputs
    card = [ClassInfo("n01530575", "brambling"), ClassInfo("n01443537", "goldfish"), ClassInfo(None, "other")]
    assert not needs_evidence(_data("n01530575", "n01443537"), 3, card)  # the card's order: outputs 0, 1
    assert needs_evidence(_data("n01443537", "n01530575"), 3, card)  # outputs 1, 0
    assert needs_evidence(_data("n01443537", "n01530575"), 4, card)  # a card of another length: no map


def test_folder_classes_that_are_not_wnids_keep_their_folder_names(tmp_path):
    for name in ("cats", "dogs"):
        _jpeg(tmp_path / "val" / name / f"{name}.JPEG")
    data = open_data(tmp_path)
    assert data.classes == (ClassInfo("cats", "cats"), ClassInfo("dogs", "dogs"))
    with pytest.raises(VizError, match="^--label-space bogus: expected one of auto, imagenet, folder$"):
        datasets.match_model(data, 2, label_space="bogus")
