"""viz.evaluate by hand: the predictions of a tiny linear model (probabilities, top 5, true class, flip TTA as
the softmax of the mean logits, evaluation order, skipped keys), the summary's numbers, and predictions.csv
written and read back exactly, with one-line errors for a missing, foreign or damaged file."""

from __future__ import annotations

import json
import time

import pytest
import torch

from viz import evaluate
from viz.evaluate import Evaluation, Prediction
from viz.loader import Batch
from viz.weights import VizError

OUTPUTS = 7


class Linear(torch.nn.Module):
    """Logits linear in the pixels (so an image and its mirror score differently); records its mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 2 * 4, OUTPUTS)
        self.modes = []

    def forward(self, images):
        self.modes.append((self.training, torch.is_inference_mode_enabled()))
        return 3 * self.fc(images.flatten(1))


def make_batches():
    torch.manual_seed(1)
    images = torch.randn(4, 3, 2, 4)
    # out of evaluation order, an unreadable image in the first batch, a batch of unreadable images only
    return images, [Batch([3, 1], ["k3", "k1"], [6, 2], images[:2], ["bad0"]),
                    Batch([], [], [], torch.zeros(0, 3, 2, 4), ["bad1", "bad2"]),
                    Batch([0, 2], ["k0", "k2"], [0, 5], images[2:], [])]


@pytest.mark.parametrize("flip", [False, True])
def test_predictions_are_the_softmax_of_the_mean_logits_in_evaluation_order(flip, capsys):
    model = Linear()
    model.train()
    images, batches = make_batches()
    start = time.perf_counter()
    result = evaluate.predict(model, batches, device=torch.device("cpu"), flip=flip, progress=False)
    elapsed = time.perf_counter() - start
    assert capsys.readouterr().err == ""  # progress=False: no bar
    assert model.modes and all(mode == (False, True) for mode in model.modes)  # eval mode, inference mode
    with torch.no_grad():
        logits = model(images)
        if flip:
            logits = (logits + model(images.flip(3))) / 2
    probs = torch.softmax(logits, dim=1)
    if flip:  # the mirror matters for these images
        assert not torch.allclose(probs, torch.softmax(model(images).detach(), dim=1), atol=1e-3)
    rows = {3: 0, 1: 1, 0: 2, 2: 3}  # evaluation index -> row of `images`
    labels = {3: 6, 1: 2, 0: 0, 2: 5}
    assert [p.index for p in result.predictions] == [0, 1, 2, 3]
    assert [p.key for p in result.predictions] == ["k0", "k1", "k2", "k3"]
    for p in result.predictions:
        row = probs[rows[p.index]]
        top_probs, top = row.topk(5)
        assert p.label == labels[p.index]
        assert p.top5 == tuple(top.tolist()) and len(p.top5) == 5
        assert p.predicted == p.top5[0] == int(row.argmax())
        assert p.top5_probs == pytest.approx(top_probs.tolist(), abs=1e-6)
        assert p.confidence == pytest.approx(float(top_probs[0]), abs=1e-6)
        assert p.true_prob == pytest.approx(float(row[p.label]), abs=1e-6)
    assert result.skipped == ["bad0", "bad1", "bad2"]
    assert result.meta == {"outputs": OUTPUTS} and 0 < result.seconds <= elapsed


def test_progress_bar_counts_images_and_skipped_ones(capsys):
    _, batches = make_batches()
    evaluate.predict(Linear(), batches, device=torch.device("cpu"), total=7)  # a bar by default
    err = capsys.readouterr().err
    assert "evaluating:" in err and "7/7" in err and "img/s" in err


def prediction(index, label, predicted, top5=(), top5_probs=()):
    return Prediction(index, f"k{index}", label, predicted, 0.5, 0.25, top5, top5_probs)


def test_correct_and_top5_correct():
    assert prediction(0, 3, 3).correct and not prediction(0, 3, 4).correct
    assert prediction(0, 3, 3).top5_correct and not prediction(0, 3, 4).top5_correct  # no top 5: the prediction
    assert prediction(0, 3, 4, (4, 1, 3, 0, 2)).top5_correct
    assert not prediction(0, 5, 4, (4, 1, 3, 0, 2)).top5_correct


def test_summary_numbers():
    ranked = (1, 2, 3, 4, 5)
    predictions = [prediction(0, 1, 1, ranked), prediction(1, 3, 1, ranked), prediction(2, 9, 1, ranked)]
    ev = Evaluation(predictions, ["bad"], 1.23456, {"outputs": 10})
    assert ev.top1 == 1 / 3 and ev.top5 == 2 / 3 and ev.mistakes == 2
    assert ev.summary() == {"images": 3, "skipped": 1, "top1": 0.333333, "top5": 0.666667, "outputs": 10,
                            "correct": 1, "seconds": 1.235, "images_per_s": 2.4}
    assert Evaluation(predictions, [], 0.0, {}).summary()["images_per_s"] is None
    assert Evaluation(predictions, [], 0.5, {}).summary()["images_per_s"] == 6.0  # under a second
    assert Evaluation(predictions, [], 0.0, {}).top5 == 2 / 3  # outputs unknown: counted
    assert Evaluation(predictions, [], 0.0, {"outputs": 6}).top5 == 2 / 3
    assert Evaluation(predictions, [], 0.0, {"outputs": 5}).top5 is None
    assert Evaluation([prediction(0, 1, 1, ranked)]).top1 == 1.0 and Evaluation([prediction(0, 1, 1, ranked)]).top5 == 1.0
    empty = Evaluation([])
    assert empty.top1 == 0.0 and empty.top5 == 0.0 and empty.mistakes == 0 and empty.skipped == []
    assert evaluate.format_top5(None) == "n/a (5 outputs or fewer)" and evaluate.format_top5(0.123456) == "12.35%"


def test_precision_names_and_meta_path(tmp_path):
    assert evaluate.precision_name(None) == "fp32"
    assert evaluate.precision_name(torch.bfloat16) == "bfloat16"
    assert evaluate.precision_name(torch.float16) == "float16"
    assert evaluate.meta_path(tmp_path / "p.csv") == tmp_path / "p.json"
    assert evaluate.meta_path(str(tmp_path / "p.csv")) == tmp_path / "p.json"


def saved(tmp_path):
    predictions = [Prediction(0, "a,b", 2, 2, 0.5, 0.5, (2, 0, 1), (0.5, 0.25, 0.125)),
                   Prediction(1, "k1", 0, 1, 0.75, 0.0625, (1, 0, 2), (0.75, 0.0625, 0.03125))]
    ev = Evaluation(predictions, ["bad0", "bad1"], 2.0004, {"outputs": 3, "checkpoint": "best.pt", "flip": True})
    path = tmp_path / "predictions.csv"
    evaluate.save(str(path), ev)
    return path, ev


def test_predictions_file_round_trip(tmp_path):
    path, ev = saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "predictions.json"]  # no temp files
    assert path.read_text().splitlines() == ["index,key,label,top5,top5_probs,true_prob",
                                             '0,"a,b",2,2 0 1,0.5 0.25 0.125,0.5',
                                             "1,k1,0,1 0 2,0.75 0.0625 0.03125,0.0625"]
    text = (tmp_path / "predictions.json").read_text()
    assert text.startswith('{\n "') and text.endswith("}\n")
    meta = json.loads(text)
    assert meta == {"outputs": 3, "checkpoint": "best.pt", "flip": True, "images": 2, "skipped": 2, "top1": 0.5,
                    "top5": None, "correct": 1, "seconds": 2.0, "images_per_s": 1.0,
                    "skipped_keys": ["bad0", "bad1"], "columns": evaluate.COLUMNS}
    back = evaluate.load(str(path))
    assert back.predictions == ev.predictions
    assert back.skipped == ["bad0", "bad1"] and back.seconds == 2.0
    assert back.meta == {"outputs": 3, "checkpoint": "best.pt", "flip": True}


def test_seconds_missing_from_the_summary_read_as_zero(tmp_path):
    path, _ = saved(tmp_path)
    meta = json.loads((tmp_path / "predictions.json").read_text())
    del meta["seconds"], meta["skipped_keys"]
    (tmp_path / "predictions.json").write_text(json.dumps(meta))
    back = evaluate.load(path)
    assert back.seconds == 0.0 and back.skipped == []


def test_a_failed_save_leaves_no_predictions_file(tmp_path):
    broken = Evaluation([Prediction(0, "k", 0, 0, 0.5, 0.5, (0,), ("not a number",))], [], 1.0, {})
    with pytest.raises(ValueError):
        evaluate.save(tmp_path / "predictions.csv", broken)
    assert not (tmp_path / "predictions.csv").exists() and not (tmp_path / "predictions.json").exists()


def test_load_errors_are_one_line(tmp_path):
    path = tmp_path / "predictions.csv"
    with pytest.raises(VizError, match=rf"^--predictions {path}: no such file \(or its .json summary is missing\)$"):
        evaluate.load(path)
    path.write_text("index,key,label,top5,top5_probs,true_prob\n")
    with pytest.raises(VizError, match="no such file"):  # the CSV without its .json
        evaluate.load(path)
    path.unlink()
    (tmp_path / "predictions.json").write_text("{}")
    with pytest.raises(VizError, match="no such file"):  # the .json without its CSV
        evaluate.load(path)

    path.write_text("index,key,label,top5\n0,k,1,1 2\n")
    with pytest.raises(VizError, match=rf"^--predictions {path}: expected the columns "
                                       r"index,key,label,top5,top5_probs,true_prob$"):
        evaluate.load(path)
    header = "index,key,label,top5,top5_probs,true_prob\n"
    good = "0,k0,1,1 2,0.5 0.25,0.5\n"
    for row in ["1,k1,x,1 2,0.5 0.25,0.5\n", "1,k1,1,,,0.5\n", "1,k1,1,1 2,0.5 0.25,?\n"]:
        path.write_text(header + good + row)
        with pytest.raises(VizError, match=rf"^--predictions {path}:3: malformed row \("):
            evaluate.load(path)
    path.write_text(header + "0,k0,1,1 2,,0.5\n")  # top-5 classes without probabilities
    with pytest.raises(VizError, match=rf"^--predictions {path}:2: malformed row \("):
        evaluate.load(path)
    path.write_text(header + good)
    assert evaluate.load(path).predictions == [Prediction(0, "k0", 1, 1, 0.5, 0.5, (1, 2), (0.5, 0.25))]


def test_predict_scores_under_the_asked_precision():
    _, batches = make_batches()
    full = evaluate.predict(Linear(), batches, device=torch.device("cpu"), progress=False)
    _, batches = make_batches()
    low = evaluate.predict(Linear(), batches, device=torch.device("cpu"), amp_dtype=torch.bfloat16, progress=False)
    assert [p.true_prob for p in low.predictions] != [p.true_prob for p in full.predictions]  # computed in bf16
    assert [p.true_prob for p in low.predictions] == pytest.approx([p.true_prob for p in full.predictions], abs=0.05)
