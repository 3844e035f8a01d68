"""Training configuration: typed dataclasses (every default), YAML presets, dotted CLI overrides.

Resolution order, one way only:
  1. the dataclasses below hold every default (one source of truth);
  2. a preset (`train/configs/<name>.yaml` or any YAML file) overlays what it sets;
  3. dotted overrides from the command line (`--optim.lr_per_256=0.2`) come last.
Unknown sections or keys, wrong types and out-of-range values raise `ConfigError` with a one-line
message naming the key and where the value came from. Booleans accept only true/false (yes/no).
The resolved `Config` is frozen; `to_dict` / `config_from_dict` turn it into the plain dict that is
written to RUN_DIR/config.yaml and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration the trainer cannot use; the message is one line meant for the user."""


def _opt(default, help: str, *, choices: tuple | None = None, check: tuple[str, typing.Callable] | None = None):
    """A config field: default, help text (with unit), optional allowed values or (description, predicate)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check})


_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_FRACTION = ("between 0 and 1", lambda v: 0 <= v <= 1)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _opt("resnet50", "torchvision architecture (resnet18 only to make tests fast)",
                     choices=("resnet50", "resnet18"))
    blurpool: bool = _opt(True, "fixed 3x3 binomial low-pass before every strided conv with >= 16 input channels")
    zero_init_residual: bool = _opt(False, "start the last BatchNorm gamma of each residual block at 0")
    channels_last: bool = _opt(True, "NHWC memory format for weights and activations (faster tensor cores)")
    compile: bool = _opt(False, "torch.compile the training model (minutes of compile time per resolution)")
    init: str = _opt("", "start a new run from these weights (weights only; optimizer, schedule and data order start "
                     "fresh): model.safetensors, a checkpoint, model_final.pth, a run folder, or 'torchvision' "
                     "(its ImageNet weights from the torch cache, never downloaded); a classifier with another class "
                     "count is replaced. Resuming a run (all state) needs no flag: re-run the same command")


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = _opt(512, "training images per process per step; global batch = batch_size x processes",
                           check=_POSITIVE)
    num_threads: int = _opt(8, "DALI CPU threads per process", check=_POSITIVE)
    min_area: float = _opt(0.08, "smallest random-resized-crop area, as a fraction of the image",
                           check=("in (0, 1]", lambda v: 0 < v <= 1))
    allow_unshuffled: bool = _opt(False, "train even if the train shards look class-sorted (fewer than half the "
                                  "classes per shard that a random order gives); off: refuse, they would train badly")
    decode: str = _opt("auto", "training decode path: fused (decoders.image_random_crop), split (decoders.image + "
                       "random_resized_crop: the fallback for GPUs where the fused mixed decoder fails), auto (fused, "
                       "checked in a child process on a GPU; split if that or the first batch fails)",
                       choices=("auto", "fused", "split"))
    verify: str = _opt("sha256", "before training, check every shard against manifest.json: sha256 (sizes and "
                       "checksums; a shard is read once per copy, then remembered in SHARDS/.verified.json by size "
                       "and mtime; ~1 s per GiB per process, see docs/RELIABILITY.md) or size (byte counts only: a "
                       "damaged JPEG of the same size can crash DALI's decoder mid-run)", choices=("sha256", "size"))
    prefetch_depth: int = _opt(2, "batches DALI prepares ahead of the one being trained on, per process (its "
                               "prefetch_queue_depth); each holds one decoded batch in GPU memory (512 x 192 x 192 x 3 "
                               "x 2 bytes = 113 MB at bf16)", check=("an integer >= 1", lambda v: v >= 1))
    hw_decoder_load: float = _opt(-1.0, "share (0-1) of each batch's JPEGs that the GPU ('mixed') decoder sends to the "
                                  "GPU's hardware JPEG decoder (A100, H100, H200), the rest to CUDA decoding with "
                                  "host Huffman decoding; -1: by GPU (0.9 on H100/H200, DALI's default 0.65 "
                                  "elsewhere); no effect on the CPU decoder",
                                  check=("-1 (by GPU) or between 0 and 1", lambda v: v == -1 or 0 <= v <= 1))


@dataclass(frozen=True)
class OptimConfig:
    lr_per_256: float = _opt(0.10625, "peak learning rate per 256 images of global batch "
                             "(peak lr = lr_per_256 x global_batch / 256; 0.10625 gives FFCV's 1.7 at 4096)",
                             check=_POSITIVE)
    lr: float = _opt(0.0, "peak learning rate for the whole global batch, as FFCV states it (1.7 at 4096); "
                     "when > 0 it replaces lr_per_256", check=_NON_NEGATIVE)
    momentum: float = _opt(0.9, "SGD momentum", check=("in [0, 1)", lambda v: 0 <= v < 1))
    weight_decay: float = _opt(1e-4, "L2 weight decay; never applied to BatchNorm parameters or biases",
                               check=_NON_NEGATIVE)
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy target",
                                  check=("in [0, 1)", lambda v: 0 <= v < 1))
    accum_steps: int = _opt(1, "batches whose gradients make one optimizer step (gradient accumulation): global "
                            "batch = data.batch_size x processes x accum_steps, and the LR follows it; for GPUs "
                            "too small for the recipe's batch (BatchNorm still sees data.batch_size images)",
                            check=_POSITIVE)


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = _opt(24, "training epochs; the LR reaches 0 at the end of the last one", check=_POSITIVE)
    warmup_epochs: float = _opt(2.0, "epochs of linear LR warm-up from lr x warmup_start_factor to the peak",
                                check=_NON_NEGATIVE)
    warmup_start_factor: float = _opt(1e-4, "LR at step 0 as a fraction of the peak",
                                      check=("in [0, 1]", lambda v: 0 <= v <= 1))
    res_min: int = _opt(160, "training resolution before the ramp, pixels", check=_POSITIVE)
    res_max: int = _opt(192, "training resolution after the ramp, pixels", check=_POSITIVE)
    res_ramp_start: float = _opt(0.75, "ramp start as a fraction of epochs (FFCV's start_ramp = round(f x epochs) - 1)",
                                 check=_FRACTION)
    res_ramp_end: float = _opt(0.875, "ramp end as a fraction of epochs (FFCV's end_ramp = round(f x epochs) - 1)",
                               check=_FRACTION)
    res_multiple: int = _opt(32, "training resolutions are rounded to multiples of this, pixels", check=_POSITIVE)


@dataclass(frozen=True)
class ValConfig:
    res: int = _opt(256, "validation resolution, pixels (larger than training: the FixRes effect)", check=_POSITIVE)
    crop_ratio: float = _opt(0.875, "centre-crop side / resized shorter side (224/256)",
                             check=("in (0, 1]", lambda v: 0 < v <= 1))
    batch_size: int = _opt(256, "validation images per process per step", check=_POSITIVE)
    flip_tta: bool = _opt(True, "average the logits of each image and its left-right mirror")
    every_epochs: int = _opt(1, "validate every N epochs (the last epoch is always validated)", check=_POSITIVE)


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = _opt(False, "keep an exponential moving average of the weights; evaluate and export it")
    decay: float = _opt(0.9998, "EMA decay per optimizer step", check=("in [0, 1)", lambda v: 0 <= v < 1))


@dataclass(frozen=True)
class CheckpointConfig:
    every_minutes: float = _opt(15.0, "also save last.pt mid-epoch every N minutes of wall time (0: off)",
                                check=_NON_NEGATIVE)
    every_steps: int = _opt(0, "also save last.pt every N optimizer steps (0: off)", check=_NON_NEGATIVE)
    keep: int = _opt(2, "epoch-end checkpoints kept as checkpoints/epoch-NNN.pt besides last.pt and best.pt "
                     "(hard links: no extra disk until last.pt moves on; 0: none)", check=_NON_NEGATIVE)
    async_save: bool = _opt(False, "rank 0 writes checkpoints in a background thread from a host copy of the "
                            "state while training goes on (every rank waits for a synchronous write); a failed "
                            "write stops the run at the next save. Costs one copy of model + optimizer state "
                            "in host memory")


@dataclass(frozen=True)
class RunConfig:
    seed: int = _opt(0, "seed for weights init and data order")
    device: str = _opt("auto", "auto picks cuda when available", choices=("auto", "cuda", "cpu"))
    precision: str = _opt("auto", "auto: bf16 where the GPU supports it, else fp16 + GradScaler; fp32 on CPU",
                          choices=("auto", "bf16", "fp16", "fp32"))
    deterministic: bool = _opt(False, "deterministic kernels (bit-identical resume on CPU; slower on GPU)")
    threads: int = _opt(0, "torch CPU threads per process (0: cores / processes on this node)", check=_NON_NEGATIVE)
    sync_every: int = _opt(20, "steps between loss read-outs, non-finite checks and cross-rank stop/save "
                           "agreement (each costs a device sync)", check=_POSITIVE)
    tensorboard: bool = _opt(True, "also log metrics to RUN_DIR/tensorboard (skipped if tensorboard is missing)")
    resume: str = _opt("auto", "auto: start a new --out, resume a stopped one with the same settings, refuse a "
                       "finished one or changed settings; force: also continue a finished run past its end "
                       "(raise schedule.epochs; its final files move to finished-epoch-N/) or resume with "
                       "changed settings", choices=("auto", "force"))
    memory_check: bool = _opt(True, "refuse to start when the estimated memory per process exceeds what this "
                              "device has (the kernel's OOM killer gives no message)")
    dist_timeout_s: float = _opt(1800.0, "seconds a collective may wait for the other ranks before the run stops "
                                 "with an error (a dead or hung rank)", check=_POSITIVE)
    tracker: str = _opt("none", "also log the config, each epoch's metrics.jsonl numbers (epoch = step) and the final "
                        "top-1 to an experiment tracker (rank 0; a tracker that fails mid-run gives one warning, "
                        "training goes on): mlflow needs pip install 'imagenet-rn50[mlflow]' and MLFLOW_TRACKING_URI "
                        "(MLFLOW_EXPERIMENT_NAME optional); wandb needs pip install 'imagenet-rn50[wandb]' and `wandb "
                        "login`, or WANDB_MODE=offline (WANDB_PROJECT, WANDB_DIR optional); a resumed run continues "
                        "the tracker run named in RUN_DIR/tracker.json", choices=("none", "mlflow", "wandb"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    val: ValConfig = field(default_factory=ValConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """A preset name (`rn50`, `smoke`) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else name}.yaml"
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    raise ConfigError(f"--config {name}: neither a preset ({', '.join(presets())}) nor an existing .yaml file")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def resolve(preset: str | None = "rn50", overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the preset (name or YAML path; None for none), then `section.key=value` overrides."""
    tree = to_dict(Config())
    if preset is not None:
        path = preset_path(preset)
        try:
            overlay = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
        _overlay(tree, overlay, source=str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _set_dotted(tree, key, value, source=f"--{key}")
    return config_from_dict(tree, source="overrides")


def config_from_dict(tree: dict, source: str = "config") -> Config:
    """A validated Config from a nested dict (missing keys keep their defaults)."""
    full = to_dict(Config())
    _overlay(full, tree, source=source)
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            values[f.name] = _check(key, _cast(full[name][f.name], hints[f.name], key, source), f.metadata, source)
        sections[name] = cls(**values)
    cfg = Config(**sections)
    _check_consistency(cfg)
    return cfg


def _overlay(tree: dict, overlay: dict, source: str) -> None:
    if not isinstance(overlay, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(overlay).__name__}")
    for section, values in overlay.items():
        _known_section(section, source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _known_key(section, key, source)
            tree[section][key] = value


def _set_dotted(tree: dict, dotted: str, value: str, source: str) -> None:
    section, dot, key = dotted.partition(".")
    if not dot or "." in key:
        raise ConfigError(f"{source}: expected --section.key=value with a section from {', '.join(SECTIONS)}")
    _known_section(section, source)
    _known_key(section, key, source)
    tree[section][key] = value


def _known_section(section, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown config section {section!r}{_suggest(section, SECTIONS)}; "
                          f"sections: {', '.join(SECTIONS)}")


def _known_key(section: str, key, source: str) -> None:
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        full = [f"{section}.{n}" for n in names]
        raise ConfigError(f"{source}: unknown config key '{section}.{key}'{_suggest(f'{section}.{key}', full)}; "
                          f"keys of {section}: {', '.join(names)}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _cast(value, typ, key: str, source: str):
    """Strings (from the CLI or quoted YAML) are parsed; typed YAML values must already fit."""
    where = f"{source}: {key}={value!r}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected a boolean (true or false)")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string")
    raise TypeError(f"{key}: unsupported config type {typ}")


def _check(key: str, value, meta, source: str):
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{source}: {key}={value!r}: expected one of {', '.join(map(str, meta['choices']))}")
    if meta.get("check"):
        description, ok = meta["check"]
        if not ok(value):
            raise ConfigError(f"{source}: {key}={value!r}: must be {description}")
    return value


def _check_consistency(cfg: Config) -> None:
    s = cfg.schedule
    if s.warmup_epochs > s.epochs:
        raise ConfigError(f"schedule.warmup_epochs={s.warmup_epochs} exceeds schedule.epochs={s.epochs}")
    if s.res_min > s.res_max:
        raise ConfigError(f"schedule.res_min={s.res_min} is larger than schedule.res_max={s.res_max}")
    for key in ("res_min", "res_max"):
        if getattr(s, key) % s.res_multiple:
            raise ConfigError(f"schedule.{key}={getattr(s, key)}: must be a multiple of schedule.res_multiple={s.res_multiple}")
    if s.res_ramp_start > s.res_ramp_end:
        raise ConfigError(f"schedule.res_ramp_start={s.res_ramp_start} is after schedule.res_ramp_end={s.res_ramp_end}")


def describe() -> str:
    """Every key with its default and help, for `--help`."""
    lines = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            lines.append(f"  --{name}.{f.name}={_yaml_scalar(f.default)}\n      {f.metadata['help']}")
    return "\n".join(lines)


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def dump_yaml(cfg: Config, header: str = "") -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Keys that change speed, logging or safety nets but not the weights a run ends with: a stopped run resumes
# with new values of these without --run.resume=force (docs/RECIPES.md lists them).
RESUME_SAFE = frozenset({
    "data.num_threads", "data.decode", "data.verify", "data.prefetch_depth", "data.hw_decoder_load",
    "model.compile", "model.init", "val.batch_size", "val.every_epochs",
    "checkpoint.every_minutes", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "run.threads", "run.sync_every",
    "run.tensorboard", "run.deterministic", "run.resume", "run.memory_check", "run.dist_timeout_s",
    "run.tracker",
})


def differences(old: dict, new: Config, ignore: typing.Container[str] = ()) -> list[str]:
    """`key: old -> new` for every value that differs between a stored config dict and `new`, leaving out the
    dotted keys in `ignore`."""
    out = []
    new_tree = to_dict(new)
    for section, values in new_tree.items():
        for key, value in values.items():
            if f"{section}.{key}" in ignore:
                continue
            before = old.get(section, {}).get(key, "<absent>")
            if before != value:
                out.append(f"{section}.{key}: {before!r} -> {value!r}")
    return out
