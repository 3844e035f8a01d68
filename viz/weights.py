"""Checkpoints from any trainer -> a torchvision ResNet in eval mode, built the way the trainer built it.

Reads, without downloading anything: our best.pt / last.pt ({"model", "ema", "config", "history", ...}),
a plain torchvision state_dict (model_final.pth), and PyTorch's ImageNet example `model_best.pth.tar`
({"state_dict": {"module.…"}, "epoch", "arch", "best_acc1", "optimizer"}). "module." (DDP) and
"_orig_mod." (torch.compile) prefixes are stripped. Of our checkpoints the EMA weights are the default
when there are any, because those are the ones the trainer validated (`weights="model"` picks the raw
ones). BlurPool, memory format and precision follow the checkpoint's config (or the run folder's
config.yaml) so that the function evaluated is the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
import yaml

DEFAULT_RES = 224  # px, when neither a flag nor the checkpoint's config says
DEFAULT_CROP_RATIO = 0.875  # centre-crop side / resized shorter side (224/256)
WEIGHT_CHOICES = ("auto", "ema", "model")

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# (block type, blocks in layer3) -> torchvision constructor
_ARCHS = {("bottleneck", 6): "resnet50", ("bottleneck", 23): "resnet101", ("bottleneck", 36): "resnet152",
          ("basic", 2): "resnet18", ("basic", 6): "resnet34"}


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


def strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def detect_arch(state: dict) -> str | None:
    """The torchvision ResNet whose parameter names `state` has, or None."""
    if "fc.weight" not in state or "conv1.weight" not in state:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    layer3_blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    return _ARCHS.get((block, layer3_blocks))


def run_config(checkpoint: Path) -> dict | None:
    """RUN_DIR/config.yaml of a checkpoint saved as RUN_DIR/model_final.pth or RUN_DIR/checkpoints/*.pt."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            try:
                config = yaml.safe_load((folder / "config.yaml").read_text())
            except yaml.YAMLError as exc:
                raise VizError(f"{folder / 'config.yaml'}: not valid YAML ({exc})") from exc
            return config if isinstance(config, dict) else None
    return None


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


def _read(path: Path):
    if not path.is_file():
        raise VizError(f"--checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VizError(f"--checkpoint {path}: not a weights-only PyTorch checkpoint ({reason[:200]})") from exc


def _pick_state(obj, path: Path, weights: str) -> tuple[dict, dict | None, str, dict]:
    """(state_dict, config, "model"|"ema", info) of a loaded checkpoint object."""
    config, chosen, info = None, "model", {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # ours
        state, config = obj["model"], obj.get("config")
        ema = obj.get("ema")
        has_ema = isinstance(ema, dict) and isinstance(ema.get("model"), dict)
        if weights == "ema" and not has_ema:
            raise VizError(f"--weights ema: {path} holds no EMA weights (the run had ema.enabled=false)")
        if has_ema and weights in ("auto", "ema"):
            state, chosen = ema["model"], "ema"
        history = obj.get("history")
        # Saved at an epoch end (step 0): the last record's top-1 was measured on these very weights
        # (the EMA ones when the run had EMA).
        if (chosen == ("ema" if has_ema else "model") and obj.get("step") == 0 and isinstance(history, list)
                and history and isinstance(history[-1], dict) and "top1" in history[-1]):
            info.update(trainer_top1=float(history[-1]["top1"]), trainer_top5=history[-1].get("top5"),
                        trainer_images=history[-1].get("val_images"), epoch=history[-1].get("epoch"))
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # PyTorch ImageNet example
        state = obj["state_dict"]
        for key in ("epoch", "arch", "best_acc1"):
            if isinstance(obj.get(key), (int, float, str)) or isinstance(obj.get(key), torch.Tensor):
                value = obj[key]
                info[key] = value.item() if isinstance(value, torch.Tensor) else value
    else:
        state = obj
    if weights == "ema" and chosen != "ema":
        raise VizError(f"--weights ema: {path} is not one of our checkpoints with EMA weights")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VizError(f"--checkpoint {path}: expected a state_dict, or a dict with one under 'model' or 'state_dict'")
    return state, config if isinstance(config, dict) else None, chosen, info


def load_model(path: str | Path, num_classes: int | None = None, blurpool: bool | None = None,
               weights: str = "auto") -> LoadedModel:
    """A torchvision ResNet in eval mode (on the CPU) with the checkpoint's weights.

    blurpool=None follows the trainer's config (BlurPool changes the function but not the state_dict, so
    a BlurPool model evaluated without it loses accuracy)."""
    if weights not in WEIGHT_CHOICES:
        raise VizError(f"--weights {weights}: expected one of {', '.join(WEIGHT_CHOICES)}")
    path = Path(path)
    state, config, chosen, info = _pick_state(_read(path), path, weights)
    state = strip_prefixes(state)
    arch = detect_arch(state)
    if arch is None:
        raise VizError(f"--checkpoint {path}: not a torchvision ResNet-18/34/50/101/152 state_dict "
                       f"(keys like {', '.join(list(state)[:3])})")
    if isinstance(info.get("arch"), str) and info["arch"] != arch:
        raise VizError(f"--checkpoint {path}: says arch {info['arch']!r} but its weights are a {arch}")
    classes = int(state["fc.weight"].shape[0])
    if num_classes is not None and num_classes != classes:
        raise VizError(f"--checkpoint {path}: has {classes} classes (fc.weight rows), --num-classes says {num_classes}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong)) if v]
        raise VizError(f"--checkpoint {path}: weights do not fit torchvision {arch}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    config = config or run_config(path)
    model_cfg = _section(config, "model")
    if blurpool is None:
        blurpool = bool(model_cfg.get("blurpool", False))
    if blurpool:
        from train.model import add_blurpool  # the trainer's own definition, so both compute the same function

        add_blurpool(model)
    channels_last = bool(model_cfg.get("channels_last", False))  # as the trainer held its weights
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model.eval(), arch, classes, config, blurpool, chosen, channels_last, info)


def describe(loaded: LoadedModel) -> str:
    details = [d for d, on in (("BlurPool", loaded.blurpool), ("EMA weights", loaded.weights == "ema")) if on]
    return f"{loaded.arch} ({', '.join(details)})" if details else loaded.arch
