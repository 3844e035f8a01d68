"""The network: torchvision ResNet-50 (optionally with BlurPool), its optimizer and a weight EMA.

Whatever options are on, `model.state_dict()` has exactly torchvision's keys and shapes: BlurPool
replaces a strided conv by a subclass with the same parameters and keeps its filter in a non-persistent
buffer. So a BlurPool model's weights also load into a plain `torchvision.models.resnet50()`, without
error, and that computes another network (the demo model: 87.33 % becomes 60.00 %). `load_model(path)`
(train/artifact.py) builds the right one from model.safetensors, a checkpoint or model_final.pth.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from train.config import ModelConfig, OptimConfig

ARCHS = {"resnet50": torchvision.models.resnet50, "resnet18": torchvision.models.resnet18}


class BlurConv2d(nn.Conv2d):
    """A strided conv preceded by a fixed 3x3 binomial low-pass (anti-aliasing, Zhang 2019; FFCV's BlurPool).

    Same parameters and state_dict as the `nn.Conv2d` it replaces; the filter is not saved.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BlurConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16  # sums to 1: keeps the mean brightness
        self.register_buffer("blur_kernel", kernel.expand(self.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_kernel.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(x)


def add_blurpool(model: nn.Module) -> int:
    """Swap every conv with stride > 1 and >= 16 input channels (not the RGB stem) for a BlurConv2d."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= 16:
                setattr(parent, name, BlurConv2d.from_conv(child))
                swapped += 1
    return swapped


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    model = ARCHS[cfg.arch](weights=None, num_classes=num_classes, zero_init_residual=cfg.zero_init_residual)
    if cfg.blurpool:
        add_blurpool(model)
    return model


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, fused: bool | None = None) -> torch.optim.SGD:
    """SGD with momentum; weight decay only on conv/linear weights (not BatchNorm, not biases).

    fused (None: when the weights are on a GPU): one kernel for the whole update instead of a few
    multi-tensor launches per step."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    if fused is None:
        fused = any(p.is_cuda for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused or None)


def load_model(path, *, weights: str = "auto") -> nn.Module:
    """The model saved in `path` (model.safetensors, best.pt, model_final.pth, a run folder), built as its
    file or run folder says (BlurPool included), in eval mode; its card is `model.card`. See train.artifact."""
    from train import artifact  # it imports this module

    return artifact.load_model(path, weights=weights)


# torchvision's ImageNet weights per architecture (the ones `--model.init=torchvision` takes from the torch cache)
TORCHVISION_WEIGHTS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V2", "resnet18": "ResNet18_Weights.IMAGENET1K_V1"}


def _class_id(c: dict) -> str | None:
    return c.get("wnid") or c.get("name")


def _other_classes(source: list[dict] | None, data: list[dict] | None) -> str | None:
    """Why the source's classes are not the data's (same count, other classes or order), or None when they are
    the same or either list is unknown."""
    if not source or not data or len(source) != len(data):
        return None
    for i, (a, b) in enumerate(zip(source, data)):
        if _class_id(a) is None or _class_id(b) is None:
            return None
        if _class_id(a) != _class_id(b):
            return f"class {i} is '{a.get('name') or _class_id(a)}' there, '{b.get('name') or _class_id(b)}' here"
    return None


def init_weights(model: nn.Module, source: str, arch: str, classes: list[dict] | None = None) -> str:
    """Load the weights of `source` into a model about to be trained (weights only: the optimizer, schedule
    and data order start fresh). `source`: any file our loader reads (model.safetensors, a checkpoint,
    model_final.pth, a run folder) or "torchvision" (its ImageNet weights, only from the torch cache: never
    downloaded here). The classifier is left at its fresh init when its class count differs, or when the source
    names its classes and they are not `classes` (the data's, as manifest.json lists them: {"wnid", "name"}) in
    the same order. Returns what was done, in one line; raises ValueError (one line) for a file that does not
    fit."""
    if source == "torchvision":
        name = TORCHVISION_WEIGHTS[arch]
        weights = torchvision.models.get_weight(name)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise ValueError(f"--model.init=torchvision: {cached} is not in the torch cache and nothing is downloaded "
                             f"here; fetch it once where there is a network (python -c \"import torchvision; "
                             f"torchvision.models.{name}.get_state_dict()\") or pass a file")
        state, origin = torch.load(cached, map_location="cpu", weights_only=True), f"torchvision {name} ({cached})"
        from preprocess.sources import imagenet_classes

        source_classes = [{"wnid": c.wnid, "name": c.name} for c in imagenet_classes()]
    else:
        from train import artifact  # it imports this module

        try:
            loaded = artifact.load(source)
        except artifact.ArtifactError as exc:
            raise ValueError(f"--model.init={source}: {exc}") from exc
        if loaded.arch != arch:
            raise ValueError(f"--model.init={source}: holds a {loaded.arch}, this run builds a {arch} "
                             f"(--model.arch={loaded.arch} to start from it)")
        state, origin = loaded.model.state_dict(), f"{source} ({loaded.arch}, {loaded.num_classes} classes)"
        source_classes = loaded.card.get("classes")
    own = model.state_dict()
    head = [k for k in ("fc.weight", "fc.bias") if k in state and state[k].shape != own[k].shape]
    relabelled = None if head else _other_classes(source_classes, classes)
    if relabelled:  # as many outputs, other meanings: its classifier would predict the source's classes
        head = [k for k in ("fc.weight", "fc.bias") if k in state]
    wrong = [k for k in own if k in state and k not in head and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if wrong or missing:
        raise ValueError(f"--model.init={source}: does not fit this {arch} ({len(wrong)} tensors of another shape, "
                         f"{len(missing)} missing, e.g. {(wrong + missing)[0]})")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in head}, strict=False)
    if relabelled:
        kept = f"a new classifier: the source's classes are not this data's ({relabelled})"
    elif head:
        kept = "a new classifier for this data's classes"
    elif source_classes and classes:
        kept = "its classifier too (the same classes in the same order)"
    else:
        kept = "its classifier too (the source names no classes: assumed to be this data's, in this order)"
    return f"weights from {origin}; {kept}; optimizer, learning-rate schedule and data order start fresh"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision state_dict on CPU, contiguous (NCHW) tensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


class ModelEma:
    """Exponential moving average of the weights (buffers such as BN statistics are copied).

    The decay ramps up as (1 + n) / (10 + n) over the first updates so early averages are not
    dominated by the random init.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.source = model  # the un-wrapped model being trained (not a DDP or compiled wrapper)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._bind()

    def _bind(self) -> None:
        # Lists made once: one multi-tensor launch per list and step instead of ~165 small copies.
        self._pairs = (list(self.module.parameters()), list(self.source.parameters()))
        self._buffers = (list(self.module.buffers()), list(self.source.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self._pairs, 1 - decay)
        torch._foreach_copy_(*self._buffers)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self._bind()
