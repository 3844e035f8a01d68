"""The trained model as a file that says how it was built and evaluated, and the one loader of our files.

At the end of a run `write_model_files` writes, beside model_final.pth (a plain state_dict, kept for
compatibility):
  RUN_DIR/model.safetensors  the final weights (the EMA ones when the run had EMA); its metadata header holds
                             the model card below, one JSON value per key
  RUN_DIR/config.json        the same card, readable without safetensors
The card: format_version, architecture, blurpool, channels_last, num_classes, classes ([{wnid, name}] in
output order), mean/std (RGB, fractions of 255), val_res (px), crop_ratio, flip_tta, val_batch_size,
precision (how the trainer scored), weights ("ema"|"model"), top1/top5/val_images/epoch of the trainer's
last validation of exactly these weights, and the commit.

BlurPool's filters are non-persistent buffers: the same state_dict loaded without BlurPool computes another
network, so a loader must know the settings. `load(path)` reads model.safetensors, best.pt / last.pt (their
resolved config), model_final.pth (config.json or config.yaml beside it), a run folder, PyTorch's ImageNet
example `model_best.pth.tar` or any torchvision ResNet state_dict; whatever carries no settings is loaded
with the defaults, and `assumed_line` names them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
import yaml
from torch import nn

from train.data import MEAN, STD

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CARD_FILE = "config.json"
WEIGHT_CHOICES = ("auto", "ema", "model")
# What a file without settings is evaluated with: torchvision's ImageNet recipe.
DEFAULTS = {"blurpool": False, "channels_last": False, "val_res": 224, "crop_ratio": 0.875, "flip_tta": False,
            "val_batch_size": 64, "precision": "auto"}

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# (block type, blocks in layer3) -> torchvision constructor
_ARCHS = {("bottleneck", 6): "resnet50", ("bottleneck", 23): "resnet101", ("bottleneck", 36): "resnet152",
          ("basic", 2): "resnet18", ("basic", 6): "resnet34"}
_REPO = Path(__file__).resolve().parents[1]


class ArtifactError(ValueError):
    """A file that cannot be loaded. `flag` is what it is about ("checkpoint" or "weights"), `value` the path
    or the option, `detail` what is wrong; str() reads "<value>: <detail>"."""

    def __init__(self, flag: str, value, detail: str):
        super().__init__(f"{value}: {detail}" if flag == "checkpoint" else f"{flag}={value}: {detail}")
        self.flag, self.value, self.detail = flag, str(value), detail


# ----------------------------------------------------------------------------- writing

def commit() -> str:
    """The checkout's commit (with '+dirty' when tracked files differ from it), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _section(config: dict | None, name: str) -> dict:
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def card_from_config(config: dict | None, *, architecture: str, num_classes: int, classes=None,
                     metrics: dict | None = None, weights: str = "model", commit_id: str | None = None) -> dict:
    """The model card of weights trained with the resolved `config` (a nested dict; missing keys: DEFAULTS)."""
    model, val, run = _section(config, "model"), _section(config, "val"), _section(config, "run")
    metrics = metrics or {}
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "blurpool": bool(model.get("blurpool", DEFAULTS["blurpool"])),
        "channels_last": bool(model.get("channels_last", DEFAULTS["channels_last"])),
        "num_classes": int(num_classes),
        "classes": [{"wnid": c.get("wnid"), "name": c.get("name")} for c in classes] if classes else None,
        "mean": list(MEAN), "std": list(STD),
        "val_res": int(val.get("res", DEFAULTS["val_res"])),
        "crop_ratio": float(val.get("crop_ratio", DEFAULTS["crop_ratio"])),
        "flip_tta": bool(val.get("flip_tta", DEFAULTS["flip_tta"])),
        "val_batch_size": int(val.get("batch_size", DEFAULTS["val_batch_size"])),
        "precision": str(run.get("precision", DEFAULTS["precision"])),
        "weights": weights,
        "top1": metrics.get("top1"), "top5": metrics.get("top5"), "val_images": metrics.get("val_images"),
        "epoch": metrics.get("epoch"),
        "commit": commit_id or "unknown",
    }


def _replace_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_model_files(run_dir: str | Path, model: nn.Module, cfg, *, classes, metrics: dict | None,
                      weights: str = "model") -> Path:
    """RUN_DIR/model.safetensors (weights + card in its header) and RUN_DIR/config.json (the card).

    cfg: the run's Config (or its nested dict); classes: the manifest's [{index, wnid, name}] list;
    metrics: the trainer's last validation record of exactly these weights (None: not validated)."""
    from train.config import to_dict

    config = cfg if isinstance(cfg, dict) else to_dict(cfg)
    state = model.state_dict()
    architecture = detect_arch(state) or _section(config, "model").get("arch", "unknown")
    classes = sorted(classes, key=lambda c: c.get("index", 0)) if classes else None
    card = card_from_config(config, architecture=architecture, num_classes=int(state["fc.weight"].shape[0]),
                            classes=classes, metrics=metrics, weights=weights, commit_id=commit())
    return save(run_dir, model, card)


def save(folder: str | Path, model: nn.Module, card: dict) -> Path:
    """FOLDER/model.safetensors with `card` in its header, and FOLDER/config.json; each written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, card_path = folder / MODEL_FILE, folder / CARD_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    card_tmp = card_path.with_name(f".{card_path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", **{k: json.dumps(v) for k, v in card.items()}})
        card_tmp.write_text(json.dumps(card, indent=1) + "\n")
        _replace_atomic(tmp, path)
        _replace_atomic(card_tmp, card_path)
    finally:
        tmp.unlink(missing_ok=True)
        card_tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Loaded:
    model: nn.Module  # eval mode, on the CPU, built as the card says
    card: dict  # every key of card_from_config filled: from the file, its run folder, else DEFAULTS
    weights: str  # "model", or "ema" when EMA weights were loaded
    assumed: bool  # True when neither the file nor its run folder said how it was built: DEFAULTS were used
    config: dict | None = None  # the trainer's resolved config, when the file or its run folder holds one
    info: dict = field(default_factory=dict)  # epoch, best_acc1 (PyTorch example), trainer_top1 of these weights

    @property
    def arch(self) -> str:
        return self.card["architecture"]

    @property
    def num_classes(self) -> int:
        return self.card["num_classes"]


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


def run_config(path: Path) -> dict | None:
    """RUN_DIR/config.yaml of a file saved as RUN_DIR/model_final.pth or RUN_DIR/checkpoints/*.pt."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            try:
                config = yaml.safe_load((folder / "config.yaml").read_text())
            except yaml.YAMLError as exc:
                raise ArtifactError("checkpoint", folder / "config.yaml", f"not valid YAML ({exc})") from exc
            return config if isinstance(config, dict) else None
    return None


def _card_beside(path: Path) -> dict | None:
    """RUN_DIR/config.json (our card) of a file in RUN_DIR or RUN_DIR/checkpoints, if there is one."""
    for folder in (path.parent, path.parent.parent):
        card_path = folder / CARD_FILE
        if card_path.is_file():
            try:
                card = json.loads(card_path.read_text())
            except ValueError:
                return None
            if isinstance(card, dict) and card.get("format_version") == FORMAT_VERSION:
                return card
    return None


def resolve_path(path: str | Path) -> Path:
    """A file, or the weights a run folder holds: model.safetensors, model_final.pth, checkpoints/best.pt."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, "model_final.pth", "checkpoints/best.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                return path / name
        raise ArtifactError("checkpoint", path, f"a folder without {MODEL_FILE}, model_final.pth or checkpoints/best.pt")
    if not path.is_file():
        raise ArtifactError("checkpoint", path, "no such file")
    return path


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error type has moved between releases
        raise ArtifactError("checkpoint", path, f"not a readable safetensors file ({str(exc)[:200]})") from exc
    if "format_version" not in metadata:
        return state, None
    try:
        card = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    except ValueError as exc:
        raise ArtifactError("checkpoint", path, f"metadata header is not our model card ({exc})") from exc
    return state, card


def _read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError("checkpoint", path, f"not a weights-only PyTorch checkpoint ({reason[:200]})") from exc


def _pick_state(obj, path: Path, weights: str) -> tuple[dict, dict | None, str, dict]:
    """(state_dict, config, "model"|"ema", info) of a loaded checkpoint object."""
    config, chosen, info = None, "model", {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # ours
        state, config = obj["model"], obj.get("config")
        ema = obj.get("ema")
        has_ema = isinstance(ema, dict) and isinstance(ema.get("model"), dict)
        if weights == "ema" and not has_ema:
            raise ArtifactError("weights", "ema", f"{path} holds no EMA weights (the run had ema.enabled=false)")
        if has_ema and weights in ("auto", "ema"):
            state, chosen = ema["model"], "ema"
        if isinstance(obj.get("classes"), list):  # the shards' class list, stored in every checkpoint
            info["classes"] = obj["classes"]
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
        raise ArtifactError("weights", "ema", f"{path} is not one of our checkpoints with EMA weights")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError("checkpoint", path, "expected a state_dict, or a dict with one under 'model' or 'state_dict'")
    return state, config if isinstance(config, dict) else None, chosen, info


def _build(state: dict, card: dict, path: Path) -> nn.Module:
    arch = card["architecture"]
    model = getattr(torchvision.models, arch)(weights=None, num_classes=card["num_classes"])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong)) if v]
        raise ArtifactError("checkpoint", path, f"weights do not fit torchvision {arch}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    if card["blurpool"]:
        from train.model import add_blurpool  # the trainer's own definition: both compute the same function

        add_blurpool(model)
    if card["channels_last"]:  # as the trainer held its weights: the same conv kernels, the same numbers
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def load(path: str | Path, *, weights: str = "auto", blurpool: bool | None = None) -> Loaded:
    """The model in `path` (a file or a run folder) in eval mode on the CPU, built and described as its
    card (or its run folder) says; blurpool=True/False overrides the file."""
    if weights not in WEIGHT_CHOICES:
        raise ArtifactError("weights", weights, f"expected one of {', '.join(WEIGHT_CHOICES)}")
    path = resolve_path(path)
    config, info, card = None, {}, None
    if path.suffix == ".safetensors":
        state, card = _read_safetensors(path)
        card = card or _card_beside(path)
        chosen = "model"
    else:
        state, config, chosen, info = _pick_state(_read_torch(path), path, weights)
    state = strip_prefixes(state)
    arch = detect_arch(state)
    if arch is None:
        raise ArtifactError("checkpoint", path, f"not a torchvision ResNet-18/34/50/101/152 state_dict "
                                                f"(keys like {', '.join(list(state)[:3])})")
    if isinstance(info.get("arch"), str) and info["arch"] != arch:
        raise ArtifactError("checkpoint", path, f"says arch {info['arch']!r} but its weights are a {arch}")
    num_classes = int(state["fc.weight"].shape[0])
    beside = _card_beside(path) if card is None else None
    if beside is not None and (beside.get("num_classes"), beside.get("architecture")) != (num_classes, arch):
        beside = None  # another model's card
    if card is None and config is None:
        config = run_config(path)
        if config is None and beside is not None:  # a plain state_dict beside its run's config.json
            card, beside = beside, None
    assumed = card is None and config is None
    if card is not None:  # the file's own card (model.safetensors), or its run's for model_final.pth
        chosen = card.get("weights", chosen)
        if weights != "auto" and weights != chosen:
            raise ArtifactError("weights", weights, f"{path} holds only the {chosen} weights")
        if card.get("top1") is not None:
            info.update(trainer_top1=card["top1"], trainer_top5=card.get("top5"),
                        trainer_images=card.get("val_images"), epoch=card.get("epoch"))
    else:  # a checkpoint's config (or its run's config.yaml); the class list of the run's config.json
        ordered = sorted(info.pop("classes", None) or [], key=lambda c: c.get("index", 0))
        card = card_from_config(config, architecture=arch, num_classes=num_classes, weights=chosen, classes=ordered)
        if beside is not None:
            card["classes"] = beside.get("classes")
    card = {**card_from_config(None, architecture=arch, num_classes=num_classes), **card}  # every key present
    if card["architecture"] != arch or card["num_classes"] != num_classes:
        raise ArtifactError("checkpoint", path, f"its card says {card['architecture']} with {card['num_classes']} "
                                                f"classes, its weights are a {arch} with {num_classes}")
    if blurpool is not None:
        card["blurpool"] = bool(blurpool)
    return Loaded(_build(state, card, path), card, chosen, assumed, config, info)


def describe_settings(card: dict) -> str:
    """'resnet50 without BlurPool, val 224 px, crop 0.875, no flip-TTA'."""
    return (f"{card['architecture']} {'with' if card['blurpool'] else 'without'} BlurPool, val {card['val_res']} px, "
            f"crop {card['crop_ratio']:g}, {'flip-TTA' if card['flip_tta'] else 'no flip-TTA'}")


def assumed_line(path: str | Path, card: dict) -> str:
    return (f"no settings stored with {path}: assuming {describe_settings(card)} (a BlurPool model needs "
            f"its {MODEL_FILE}, checkpoint or run folder)")


def load_model(path: str | Path, *, weights: str = "auto") -> nn.Module:
    """The module in `path` (model.safetensors, best.pt / last.pt, model_final.pth, a run folder), in eval mode
    on the CPU, with its card as `model.card` (classes, mean/std, val_res, crop_ratio, flip_tta, top-1, ...).

    A file that carries no settings (a plain state_dict away from its run folder) is built without BlurPool;
    one line on stderr names what was assumed."""
    loaded = load(path, weights=weights)
    if loaded.assumed:
        print(assumed_line(path, loaded.card), file=sys.stderr)
    model = loaded.model
    model.card = loaded.card
    return model
