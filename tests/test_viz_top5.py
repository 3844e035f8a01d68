"""viz's top-5 of a model with 5 outputs or fewer is n/a (every label is in its top 5), also when the
predictions are read back from predictions.csv; with more outputs it is the fraction of labels in the top 5."""

from __future__ import annotations

import torch

from viz import evaluate
from viz.loader import Batch


def batches(labels: list[int]):
    yield Batch(list(range(len(labels))), [f"k{i}" for i in range(len(labels))], labels,
                torch.zeros(len(labels), 3, 8, 8), [])


class Fixed(torch.nn.Module):
    """Logits that rank the classes 0, 1, 2, ... for every image."""

    def __init__(self, outputs: int):
        super().__init__()
        self.logits = torch.arange(outputs, 0, -1, dtype=torch.float32)

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1)


def test_top5_is_na_for_five_outputs_or_fewer(tmp_path):
    few = evaluate.predict(Fixed(3), batches([2, 1, 0]), device=torch.device("cpu"), progress=False)
    assert few.top1 == 1 / 3 and few.top5 is None and few.summary()["top5"] is None
    assert evaluate.format_top5(few.top5).startswith("n/a")
    many = evaluate.predict(Fixed(8), batches([0, 4, 5, 7]), device=torch.device("cpu"), progress=False)
    assert many.top5 == 0.5 and evaluate.format_top5(many.top5) == "50.00%"
    csv = tmp_path / "predictions.csv"
    evaluate.save(csv, few)
    assert evaluate.load(csv).top5 is None  # the output count travels with the saved predictions
