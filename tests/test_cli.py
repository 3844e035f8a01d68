"""The flags users type work in every command: one output flag under both names (--out and --output), and
--device spelled cpu|cuda everywhere (docs/CLI.md has the table)."""

from __future__ import annotations

import importlib
import re

import pytest

# command -> the argv prefix its --help needs (a subcommand), and whether it writes a folder or a file
WRITERS = {
    "preprocess.synthetic": [], "preprocess.shard": [], "train.main": [], "train.export": [],
    "benchmarks.proxy": [], "benchmarks.gpu_suite": [], "benchmarks.carry_data": ["unpack"],
    "viz.gradcam": [], "viz.plots": [], "viz.report": [], "viz.validate": [], "viz.predict": [],
}
DEVICE = ["viz.gradcam", "viz.predict", "viz.report", "viz.validate", "benchmarks.gpu_suite", "benchmarks.viz_eval",
          "benchmarks.train_step", "benchmarks.dataloader", "benchmarks.proxy"]


def help_text(module: str, prefix: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*prefix, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(WRITERS))
def test_out_and_output_name_the_same_flag(module, capsys):
    text = help_text(module, WRITERS[module], capsys)
    # argparse lists the spellings of one argument together: "--out OUT, --output OUT"
    assert re.search(r"--out(put)? (\S+), (--\S+ \S+, )?--out(put)? \2", text), text[:2000]


@pytest.mark.parametrize("module", DEVICE)
def test_device_is_cpu_or_cuda(module, capsys):
    text = " ".join(help_text(module, [], capsys).split())
    assert re.search(r"--device \{?(cpu,cuda|cuda,cpu)", text), text[:3000]


def test_dataloader_takes_cuda_and_keeps_gpu_as_its_old_spelling():
    from benchmarks import dataloader

    assert dataloader.parse_args(["--device", "cpu"]).device == "cpu"
    for spelling in ("cuda", "gpu"):  # both mean DALI's GPU operators; without a GPU: one line, exit 2
        with pytest.raises(SystemExit) as exit_:
            dataloader.parse_args(["--device", spelling])
        assert exit_.value.code == 2


@pytest.mark.parametrize("module,argv,line", [
    ("viz.gradcam", ["--checkpoint", "c", "--data", "d", "--output", "o", "--batch_size", "8"],
     "--batch_size: did you mean --batch-size?"),
    ("preprocess.shard", ["--out", "x", "--image-per-shard", "5"], "--image-per-shard: did you mean --images-per-shard?"),
    ("benchmarks.dataloader", ["--num-threads=2"], "--num-threads: did you mean --threads?"),
    ("viz.plots", ["run", "--frobnicate"], "(see python -m viz.plots --help)"),
])
def test_an_unknown_flag_is_one_line_that_names_the_flag_meant(module, argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments" in err and line in err, err


def test_train_main_names_the_short_flag_meant_and_takes_output(tmp_path, capsys):
    from train.main import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean --batch-size?" in err, err
    assert main(["--data", str(tmp_path), "--output", str(tmp_path / "run"), "--config", "smoke"]) == 2
    err = capsys.readouterr().err  # --output is --out: the run gets as far as the data check
    assert err.count("\n") == 1 and "manifest.json" in err, err
