"""Checkpoints from any trainer -> a torchvision ResNet in eval mode, built the way the trainer built it.

The reading is train.artifact's (the one loader of our files): model.safetensors (its card: BlurPool, class
list, val res, crop ratio, flip-TTA), our best.pt / last.pt ({"model", "ema", "config", "history", ...}), a
plain torchvision state_dict (model_final.pth: the run folder's config.json or config.yaml beside it says how
it was built), and PyTorch's ImageNet example `model_best.pth.tar` ({"state_dict": {"module.…"}, "epoch",
"arch", "best_acc1", "optimizer"}). "module." (DDP) and "_orig_mod." (torch.compile) prefixes are stripped.
Of our checkpoints the EMA weights are the default when there are any, because those are the ones the
trainer validated (`weights="model"` picks the raw ones). A file with no settings anywhere is evaluated with
the defaults below, and `assumed_line` says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from train import artifact
from train.artifact import detect_arch, strip_prefixes  # noqa: F401  (re-exported)

DEFAULT_RES = artifact.DEFAULTS["val_res"]  # px, when neither a flag nor the file says
DEFAULT_CROP_RATIO = artifact.DEFAULTS["crop_ratio"]  # centre-crop side / resized shorter side (224/256)
WEIGHT_CHOICES = artifact.WEIGHT_CHOICES


class VizError(ValueError):
    """Input that cannot be used; the message names the path or flag and what is wrong."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    arch: str
    num_classes: int
    config: dict | None  # the trainer's resolved config: in the checkpoint, else the run folder's config.yaml
    blurpool: bool
    weights: str  # "model", or "ema" when the EMA weights were loaded
    channels_last: bool
    # What the checkpoint says about itself: epoch, best_acc1 (PyTorch example), the trainer's top-1 of
    # exactly these weights (ours, saved at an epoch end), ...
    info: dict = field(default_factory=dict)
    # train.artifact's model card (every key filled): classes, val_res, crop_ratio, flip_tta, val_batch_size,
    # precision, ...; `assumed`: neither the file nor its run folder held settings, the card is the defaults
    card: dict = field(default_factory=dict)
    assumed: bool = False


def run_config(checkpoint: Path) -> dict | None:
    """RUN_DIR/config.yaml of a checkpoint saved as RUN_DIR/model_final.pth or RUN_DIR/checkpoints/*.pt."""
    try:
        return artifact.run_config(Path(checkpoint))
    except artifact.ArtifactError as exc:
        raise _viz_error(exc) from exc


def _viz_error(exc: artifact.ArtifactError) -> VizError:
    return VizError(f"--{exc.flag} {exc.value}: {exc.detail}")


def _section(config: dict | None, name: str) -> dict:
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def flip_setting(config: dict | None) -> bool:
    """Whether the trainer averaged each validation image with its mirror (its top-1 then matches ours)."""
    return bool(_section(config, "val").get("flip_tta", False))


def val_settings(config: dict | None) -> tuple[int, float]:
    """(res, crop_ratio) from the trainer's config, or the ImageNet defaults 224 / 0.875."""
    val = _section(config, "val")
    return int(val.get("res", DEFAULT_RES)), float(val.get("crop_ratio", DEFAULT_CROP_RATIO))


def val_batch_size(config: dict | None, default: int = 64) -> int:
    """The trainer's validation batch: on a CPU, per-image results can depend on the batch's size."""
    return int(_section(config, "val").get("batch_size", default))


def precision_setting(config: dict | None) -> str:
    return str(_section(config, "run").get("precision", "auto"))


def load_model(path: str | Path, num_classes: int | None = None, blurpool: bool | None = None,
               weights: str = "auto") -> LoadedModel:
    """A torchvision ResNet in eval mode (on the CPU) with the checkpoint's weights.

    blurpool=None follows the file's card or the trainer's config (BlurPool changes the function but not the
    state_dict, so a BlurPool model evaluated without it loses accuracy)."""
    try:
        loaded = artifact.load(path, weights=weights, blurpool=blurpool)
    except artifact.ArtifactError as exc:
        raise _viz_error(exc) from exc
    card = loaded.card
    if num_classes is not None and num_classes != card["num_classes"]:
        raise VizError(f"--checkpoint {path}: has {card['num_classes']} classes (fc.weight rows), --num-classes "
                       f"says {num_classes}")
    return LoadedModel(loaded.model, card["architecture"], card["num_classes"], loaded.config, card["blurpool"],
                       loaded.weights, card["channels_last"], loaded.info, card, loaded.assumed)


def describe(loaded: LoadedModel) -> str:
    details = [d for d, on in (("BlurPool", loaded.blurpool), ("EMA weights", loaded.weights == "ema")) if on]
    return f"{loaded.arch} ({', '.join(details)})" if details else loaded.arch
