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


# ----------------------------------------------------------------------------- preprocess.manifest
# (Written for `make mutation MUTATE=manifest`: the shard directory's checks and the class-mix statistics by hand.)

def _shard_dir(root, splits: dict[str, list[int]], version=1):
    """A shard directory whose tars are `bytes` long placeholders (the checks read sizes, not contents)."""
    import json

    manifest = {"format_version": version, "classes": [{"name": "tench"}, {"name": "goldfish"}], "splits": {}}
    for split, sizes in splits.items():
        (root / split).mkdir(parents=True)
        shards = []
        for i, size in enumerate(sizes):
            name = f"{split}-{i:06d}"
            (root / split / f"{name}.tar").write_bytes(b"x" * size)
            (root / split / f"{name}.idx").write_text("0 0\n")
            shards.append({"name": name, "bytes": size})
        manifest["splits"][split] = {"images": str(7 * len(sizes)), "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_manifest_errors_name_the_path_and_the_fix(tmp_path):
    from preprocess.manifest import DatasetError, load_manifest

    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=rf"^{missing}: no such directory; create shards with "
                                           rf"`python -m preprocess.shard --out {missing}`$"):
        load_manifest(missing)
    with pytest.raises(DatasetError, match=rf"^{tmp_path}/manifest.json: missing; is {tmp_path} the --out of "):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match=rf"^{tmp_path}/manifest.json: not valid JSON \(.*\); re-run "):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format_version": 2}')
    with pytest.raises(DatasetError, match=r"manifest.json: format_version 2, expected 1$"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"manifest.json: format_version None, expected 1$"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "splits": {}}')
    assert load_manifest(tmp_path) == {"format_version": 1, "splits": {}}


def test_split_shards_lists_the_pairs_in_order_and_checks_each(tmp_path):
    from preprocess import manifest as m

    manifest = _shard_dir(tmp_path, {"train": [3, 5], "val": [4], "empty": []})
    expected = [(tmp_path / "train" / f"train-00000{i}.tar", tmp_path / "train" / f"train-00000{i}.idx") for i in (0, 1)]
    assert m.split_shards(tmp_path, "train") == expected
    assert m.split_shards(str(tmp_path), "train", manifest) == expected
    assert m.split_size(manifest, "train") == 14 and m.split_size(manifest, "val") == 7
    assert m.class_names(manifest) == ["tench", "goldfish"]
    with pytest.raises(m.DatasetError, match=rf"^{tmp_path}/manifest.json: no split 'test' \(has \['empty', 'train', "
                                             r"'val'\]\)$"):
        m.split_shards(tmp_path, "test")
    with pytest.raises(m.DatasetError, match=rf"^{tmp_path}/empty: split 'empty' has no shards$"):
        m.split_shards(tmp_path, "empty")
    (tmp_path / "train" / "train-000001.tar").write_bytes(b"x" * 6)
    with pytest.raises(m.DatasetError, match=rf"^{tmp_path}/train/train-000001.tar: 6 bytes, manifest says 5; the shard "
                                             r"is damaged, delete it and re-run `python -m preprocess.shard`$"):
        m.split_shards(tmp_path, "train", manifest)
    (tmp_path / "train" / "train-000001.idx").unlink()
    with pytest.raises(m.DatasetError, match=rf"^{tmp_path}/train/train-000001.idx: listed in the manifest but missing; "
                                             r"re-run `python -m preprocess.shard` on the same --out$"):
        m.split_shards(tmp_path, "train", manifest)
    (tmp_path / "val" / "val-000000.tar").unlink()
    with pytest.raises(m.DatasetError, match=rf"^{tmp_path}/val/val-000000.tar: listed in the manifest but missing"):
        m.split_shards(tmp_path, "val", manifest)


def test_expected_distinct_classes_by_hand():
    from preprocess.manifest import expected_distinct

    # 1 - C(total - c, n) / C(total, n) per class present, 1 where fewer than n images lie outside the class
    assert expected_distinct([2, 1, 0], 1) == pytest.approx(1.0, rel=1e-12)
    assert expected_distinct([2, 1, 0], 2) == pytest.approx(1 + (1 - 1 / 3), rel=1e-12)
    assert expected_distinct([5, 3, 2], 4) == pytest.approx(3 - (5 + 35 + 70) / 210, rel=1e-12)
    assert expected_distinct([2, 0, 1], 3) == 2.0 and expected_distinct([2, 0, 1], 9) == 2.0  # all drawn
    assert expected_distinct([0, 0], 1) == 0.0


def test_mix_stats_by_hand():
    from preprocess.manifest import mix_stats

    # shards of 3, 3 and 2 images; classes 3, 4 and 1 images in all
    stats = mix_stats([[2, 0, 1], [0, 3, 0], [1, 1, 0]])
    if_random = (2 * (3 - (10 + 4 + 35) / 56) + (3 - (10 + 6 + 21) / 28)) / 3
    assert stats == {"distinct_classes_mean": 1.667, "distinct_classes_min": 1,
                     "distinct_classes_if_random": round(if_random, 3)}
    assert mix_stats([]) == {"distinct_classes_mean": 0.0, "distinct_classes_min": 0, "distinct_classes_if_random": 0.0}


def test_class_sorted_problem_threshold_and_message(tmp_path):
    from preprocess.manifest import class_sorted_problem

    def problem(mean, if_random, split="train"):
        mix = {"distinct_classes_mean": mean, "distinct_classes_min": 1, "distinct_classes_if_random": if_random}
        return class_sorted_problem(tmp_path, {"splits": {split: {"mix": mix, "shards": []}}}, split)

    assert problem(4.9, 10.0) == (f"{tmp_path}/train: shards look class-sorted (4.9 classes per shard on average; a "
                                  "random order gives 10.0), so batches would hold a handful of classes")
    assert problem(5.0, 10.0) is None  # half the random mix is still accepted
    assert problem(0.9, 2.0, "val").startswith(f"{tmp_path}/val: shards look class-sorted (0.9 classes")
    assert problem(0.5, 1.99) is None  # one or two classes in all: nothing to tell


def test_class_sorted_problem_from_the_per_shard_summaries(tmp_path):
    import json

    from preprocess.manifest import class_sorted_problem

    def with_summaries(per_shard, split="train"):
        (tmp_path / split).mkdir(exist_ok=True)
        for i, counts in enumerate(per_shard):
            (tmp_path / split / f"s{i}.json").write_text(json.dumps({"per_class": counts}))
        return {"splits": {split: {"shards": [{"name": f"s{i}"} for i in range(len(per_shard))]}}}

    sorted_shards = [[8 if c == s else 0 for c in range(8)] for s in range(8)]  # one class per shard
    assert "shards look class-sorted (1.0 classes per shard" in class_sorted_problem(tmp_path, with_summaries(sorted_shards))
    mixed = [[1] * 8 for _ in range(8)]
    assert class_sorted_problem(tmp_path, with_summaries(mixed, "val"), "val") is None
    (tmp_path / "train" / "s3.json").write_text("{}")
    cannot = (f"{tmp_path}/manifest.json: no class-mix statistics and no s3.json to compute them; cannot tell whether "
              "the train shards are shuffled")
    manifest = {"splits": {"train": {"shards": [{"name": f"s{i}"} for i in range(8)]}}}
    assert class_sorted_problem(tmp_path, manifest) == cannot
    (tmp_path / "train" / "s3.json").write_text("{broken")
    assert class_sorted_problem(tmp_path, manifest) == cannot
    (tmp_path / "train" / "s3.json").unlink()
    assert class_sorted_problem(tmp_path, manifest) == cannot
