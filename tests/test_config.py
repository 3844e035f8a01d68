"""train.config: presets resolve, overrides are typed and checked, unknown keys are rejected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train import config
from train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["rn50", "smoke"])
def test_presets_resolve(preset):
    cfg = config.resolve(preset)
    assert config.config_from_dict(config.to_dict(cfg)) == cfg  # the dict stored in checkpoints round-trips


def test_rn50_is_the_ffcv_recipe_and_epochs_is_a_parameter():
    cfg = config.resolve("rn50", ["schedule.epochs=88"])
    assert cfg.schedule.epochs == 88
    assert cfg.optim.lr_per_256 * 4096 / 256 == pytest.approx(1.7)  # FFCV's peak at global batch 4096
    assert (cfg.schedule.res_min, cfg.schedule.res_max, cfg.val.res) == (160, 192, 256)
    assert cfg.model.blurpool and cfg.val.flip_tta and cfg.optim.label_smoothing == 0.1
    assert cfg.checkpoint.async_save and not config.resolve("smoke").checkpoint.async_save  # 8 GPUs wait for no disk


def test_overrides_are_cast_and_last():
    cfg = config.resolve("smoke", ["optim.lr_per_256=0.5", "model.blurpool=false", "data.batch_size=8",
                                   "schedule.warmup_epochs=0"])
    assert cfg.optim.lr_per_256 == 0.5 and cfg.model.blurpool is False and cfg.data.batch_size == 8
    assert isinstance(cfg.schedule.warmup_epochs, float)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr_per256=1.7", "unknown config key 'optim.lr_per256' (did you mean 'optim.lr_per_256'?)"),
    ("optimizer.lr_per_256=1", "unknown config section 'optimizer'"),
    ("model.blurpool=1", "expected a boolean"),
    ("data.batch_size=3.5", "expected an integer"),
    ("data.batch_size=0", "must be > 0"),
    ("run.precision=fp8", "expected one of"),
    ("schedule.res_min=100", "multiple of schedule.res_multiple"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        config.resolve("rn50", [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_booleans_must_be_booleans(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"blurpool": 1}}))
    with pytest.raises(ConfigError, match="model.blurpool=1: expected a boolean"):
        config.resolve(str(path))
    path.write_text(yaml.safe_dump({"model": {"blurpol": True}}))
    with pytest.raises(ConfigError, match="did you mean 'model.blurpool'"):
        config.resolve(str(path))


def test_written_config_is_a_preset(tmp_path):
    cfg = config.resolve("smoke", ["schedule.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(config.dump_yaml(cfg, "a header\nof two lines"))
    assert config.resolve(str(path)) == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="neither a preset"):
        config.resolve("rn51")


def test_cli_rejects_unknown_override_with_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.main", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                           "--optim.lr_per256=1.7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "optim.lr_per_256" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_rejects_a_folder_without_shards(tmp_path, capsys):
    from train.main import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err, err
    assert not (tmp_path / "run").exists()


# Words that name a unit or a quantity's scale in a key's help text (README: "`--help` lists every key with
# its unit"). Keys that are plain numbers of no unit (a learning rate, a coefficient, a seed) are listed apart.
UNITS = ("pixels", "epochs", "images", "minutes", "seconds", "steps", "step", "threads", "batches", "fraction",
         "share", "checkpoints", "(0-1)", "/ resized")
DIMENSIONLESS = {"optim.lr_per_256", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.label_smoothing",
                 "run.seed"}


def test_help_lists_every_key_with_its_default_and_unit(capsys):
    import dataclasses

    from train.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    numeric = []
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = f.default
            shown = "true" if default is True else "false" if default is False else \
                "''" if default == "" else str(default)
            line = f"  --{key}={shown}\n"
            assert line in text, f"{key} (default {shown}) is not in --help"
            help_text = text.split(line, 1)[1].split("\n  --", 1)[0]
            assert " ".join(help_text.split()) == " ".join(f.metadata["help"].split()), key
            if isinstance(default, (int, float)) and not isinstance(default, bool) and key not in DIMENSIONLESS:
                numeric.append(key)
                assert any(unit in help_text for unit in UNITS), f"--{key}: its help names no unit: {help_text!r}"
    assert len(numeric) >= 20  # the rule above was applied, not skipped
