"""Evaluate once, save the predictions, let every view read them.

`predict` scores each batch with `train.engine.eval_logits` (the function the trainer's `evaluate` uses:
same precision, same flip averaging), so viz's top-1 is the trainer's to the image. The predictions file
is a CSV, one row per image in evaluation order:
    index, key, label, top5 (space-separated class indices), top5_probs, true_prob
with `<file>.json` beside it: what was evaluated and how (checkpoint, data, res, crop_ratio, flip, ...),
top-1/top-5, image counts, seconds and images/s.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from train.engine import eval_logits
from viz.weights import VizError

TOP_K = 5
COLUMNS = ["index", "key", "label", "top5", "top5_probs", "true_prob"]


@dataclass(frozen=True)
class Prediction:
    index: int  # position in the split's evaluation order
    key: str
    label: int
    predicted: int
    confidence: float  # softmax probability of the predicted class
    true_prob: float  # softmax probability of the true class
    top5: tuple[int, ...] = ()  # the classes ranked first to fifth
    top5_probs: tuple[float, ...] = ()

    @property
    def correct(self) -> bool:
        return self.predicted == self.label

    @property
    def top5_correct(self) -> bool:
        return self.label in (self.top5 or (self.predicted,))


@dataclass
class Evaluation:
    predictions: list[Prediction]
    skipped: list[str] = field(default_factory=list)  # keys of unreadable images
    seconds: float = 0.0  # wall time of the evaluation pass (decoding included)
    meta: dict = field(default_factory=dict)

    @property
    def top1(self) -> float:
        return sum(p.correct for p in self.predictions) / max(len(self.predictions), 1)

    @property
    def top5(self) -> float | None:
        """None for a model with 5 outputs or fewer: every label is then in its top 5."""
        if (self.meta.get("outputs") or TOP_K + 1) <= TOP_K:
            return None
        return sum(p.top5_correct for p in self.predictions) / max(len(self.predictions), 1)

    @property
    def mistakes(self) -> int:
        return sum(not p.correct for p in self.predictions)

    def summary(self) -> dict:
        n = len(self.predictions)
        top5 = None if self.top5 is None else round(self.top5, 6)
        return {"images": n, "skipped": len(self.skipped), "top1": round(self.top1, 6), "top5": top5,
                "outputs": self.meta.get("outputs"),
                "correct": n - self.mistakes, "seconds": round(self.seconds, 3),
                "images_per_s": round(n / self.seconds, 1) if self.seconds > 0 else None}


def format_top5(value: float | None) -> str:
    return "n/a (5 outputs or fewer)" if value is None else f"{value:.2%}"


def predict(model: torch.nn.Module, batches, *, device: torch.device, amp_dtype: torch.dtype | None = None,
            flip: bool = False, total: int | None = None, progress: bool = True) -> Evaluation:
    """Predictions for every readable image of `batches` (viz.loader.Batch), in evaluation order.

    Probabilities are the softmax of the mean logits (of the image and, with `flip`, its mirror)."""
    model.eval()
    predictions, skipped, outputs = [], [], None
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="evaluating", disable=not progress,
                                      dynamic_ncols=True, smoothing=0.1) as bar:
        for batch in batches:
            skipped += batch.skipped
            bar.update(len(batch.indices) + len(batch.skipped))
            if not batch.indices:
                continue
            images = batch.images.to(device, non_blocking=True)  # channels_last strides, as the trainer's
            logits = eval_logits(model, images, amp_dtype=amp_dtype, flip_tta=flip)
            probs = torch.softmax(logits / 2 if flip else logits, dim=1).cpu()
            outputs = probs.shape[1]
            top_probs, top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
            labels = torch.tensor(batch.labels)
            true_prob = probs[torch.arange(len(labels)), labels]
            for i, (index, key, label) in enumerate(zip(batch.indices, batch.keys, batch.labels)):
                predictions.append(Prediction(index, key, label, int(top[i, 0]), float(top_probs[i, 0]),
                                              float(true_prob[i]), tuple(top[i].tolist()),
                                              tuple(top_probs[i].tolist())))
    return Evaluation(sorted(predictions, key=lambda p: p.index), skipped, time.perf_counter() - start,
                      {"outputs": outputs})


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a predictions file records the evaluation's autocast dtype: fp32, bfloat16 or float16."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"


# ----------------------------------------------------------------------------- the predictions file

def meta_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save(path: Path, evaluation: Evaluation) -> None:
    """The CSV and its JSON summary; written to temporary names first, so a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for p in evaluation.predictions:
            writer.writerow([p.index, p.key, p.label, " ".join(map(str, p.top5)),
                             " ".join(f"{q:.6g}" for q in p.top5_probs), f"{p.true_prob:.6g}"])
    meta = {**evaluation.meta, **evaluation.summary(), "skipped_keys": evaluation.skipped,
            "columns": COLUMNS}
    meta_tmp = meta_path(path).with_name(f".{meta_path(path).name}.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)
    meta_tmp.replace(meta_path(path))


def load(path: Path) -> Evaluation:
    """An Evaluation read back from a predictions file (and its JSON summary)."""
    path = Path(path)
    if not path.is_file() or not meta_path(path).is_file():
        raise VizError(f"--predictions {path}: no such file (or its .json summary is missing)")
    meta = json.loads(meta_path(path).read_text())
    predictions = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise VizError(f"--predictions {path}: expected the columns {','.join(COLUMNS)}")
        for n, row in enumerate(reader, 2):
            try:
                top5 = tuple(int(c) for c in row["top5"].split())
                probs = tuple(float(q) for q in row["top5_probs"].split())
                predictions.append(Prediction(int(row["index"]), row["key"], int(row["label"]), top5[0], probs[0],
                                              float(row["true_prob"]), top5, probs))
            except (ValueError, IndexError) as exc:
                raise VizError(f"--predictions {path}:{n}: malformed row ({exc})") from exc
    seconds = float(meta.get("seconds") or 0.0)
    summary_keys = {"images", "skipped", "top1", "top5", "correct", "seconds", "images_per_s", "skipped_keys",
                    "columns"}
    return Evaluation(predictions, list(meta.get("skipped_keys", [])), seconds,
                      {k: v for k, v in meta.items() if k not in summary_keys})
