"""Which predictions to show: the most confident mistakes, per-class accuracy, the most confused pairs.

Pure functions of a list of `viz.evaluate.Prediction`; nothing here reads files or runs the model.
"""

from __future__ import annotations

import difflib
import random
from collections import defaultdict
from dataclasses import dataclass

from viz.evaluate import Prediction
from viz.weights import VizError

SELECT_MODES = "confident | random | class=<name>"


def find_class(name: str, classes) -> int:
    """Index of the class called `name` (or with that wnid), case-insensitive."""
    wanted = name.strip().lower()
    for i, c in enumerate(classes):
        if wanted in (c.name.lower(), (c.wnid or "").lower()):
            return i
    close = difflib.get_close_matches(wanted, [c.name.lower() for c in classes], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise VizError(f"--select class={name}: no such class{hint}")


def select_mistakes(predictions: list[Prediction], num_show: int, how: str = "confident", seed: int = 0,
                    class_index: int | None = None) -> list[Prediction]:
    """Misclassified predictions, most confident first. how="random" draws them with `seed` instead of
    taking the top; `class_index` keeps only mistakes whose true class it is."""
    mistakes = [p for p in predictions if p.predicted != p.label]
    if class_index is not None:
        mistakes = [p for p in mistakes if p.label == class_index]
    if how == "random":
        mistakes = random.Random(seed).sample(sorted(mistakes, key=lambda p: p.index), min(num_show, len(mistakes)))
    return sorted(mistakes, key=lambda p: (-p.confidence, p.index))[:num_show]


@dataclass(frozen=True)
class ClassScore:
    index: int
    images: int
    correct: int
    top5_correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    @property
    def top5(self) -> float:
        return self.top5_correct / self.images if self.images else 0.0


def per_class(predictions: list[Prediction]) -> list[ClassScore]:
    """Top-1/top-5 of every class that has images, worst first (ties: fewer images, then index)."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for p in predictions:
        c = counts[p.label]
        c[0] += 1
        c[1] += p.correct
        c[2] += p.top5_correct
    scores = [ClassScore(label, *c) for label, c in counts.items()]
    return sorted(scores, key=lambda s: (s.accuracy, -s.images, s.index))


@dataclass(frozen=True)
class Confusion:
    true: int
    predicted: int
    count: int  # images of class `true` predicted as `predicted`
    of: int  # images of class `true`
    examples: tuple[Prediction, ...]  # the most confident of them first


def confused_pairs(predictions: list[Prediction], top: int = 10, examples: int = 4) -> list[Confusion]:
    """The (true, predicted) pairs with the most mistakes, most first (ties: by class indices)."""
    pairs: dict[tuple[int, int], list[Prediction]] = defaultdict(list)
    sizes: dict[int, int] = defaultdict(int)
    for p in predictions:
        sizes[p.label] += 1
        if not p.correct:
            pairs[(p.label, p.predicted)].append(p)
    ranked = sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    return [Confusion(t, q, len(ps), sizes[t],
                      tuple(sorted(ps, key=lambda p: (-p.confidence, p.index))[:examples]))
            for (t, q), ps in ranked]
