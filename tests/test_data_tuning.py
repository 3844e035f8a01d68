"""train.data's loader settings that only change speed: readers parse their indexes at the first run, not in
build() (lazy_init: build() holds the GIL, a run does not), prefetch_depth (DALI's prefetch_queue_depth) changes
no batch and a mid-epoch state resumes across depths, and hw_decoder_load reaches the GPU decoder (by GPU when
-1); the two config keys are checked and resume-safe."""

from __future__ import annotations

import pytest
import torch

from preprocess.manifest import split_shards
from train import config, data
from train.data import TrainLoader


def _equal(batches, others):
    return len(batches) == len(others) and all(torch.equal(x, ox) and torch.equal(y, oy)
                                               for (x, y), (ox, oy) in zip(batches, others))


def test_readers_parse_their_indexes_at_the_first_run_not_in_build(shards_dir):
    shards = split_shards(shards_dir, "train")
    tars, missing = [t for t, _ in shards], [f"{i}.missing" for _, i in shards]
    pipe = data.build_train_pipeline(tars, missing, batch_size=4, res=32, shuffle_buffer=0)  # no error yet
    with pytest.raises(RuntimeError, match="idx.missing"):
        pipe.run()
    val = data.build_val_pipeline(tars, missing, batch_size=4, res=32)
    with pytest.raises(RuntimeError, match="idx.missing"):
        val.run()


def test_prefetch_depth_changes_no_batch_and_a_mid_epoch_state_resumes_across_depths(shards_dir):
    reference = list(TrainLoader(shards_dir, 16, seed=7).epoch(1, 32))
    deep = TrainLoader(shards_dir, 16, seed=7, prefetch_depth=4)
    batches = deep.epoch(1, 32)
    first = [next(batches) for _ in range(3)]
    assert _equal(first, reference[:3])
    state = deep.state_dict()
    for depth in (1, 3):
        resumed = TrainLoader(shards_dir, 16, seed=7, prefetch_depth=depth)
        resumed.load_state_dict(state)
        assert _equal(list(resumed.epoch(1, 32)), reference[3:])
    val = [y for _, y in data.ValLoader(shards_dir, 16, res=32, prefetch_depth=3)]
    assert torch.equal(torch.cat(val), torch.cat([y for _, y in data.ValLoader(shards_dir, 16, res=32)]))


def test_hw_decoder_load_reaches_the_gpu_decoder_and_defaults_by_gpu(monkeypatch):
    assert data._decoder_args(None, 500, 0.99) == {"device": "cpu"}  # the CPU decoder has no such argument
    assert data._decoder_args(0, None, 0.99) == {"device": "mixed", "hw_decoder_load": 0.99}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, load in (((9, 0), 0.9), ((8, 0), data.DALI_HW_DECODER_LOAD), ((10, 0), 0.65)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert data._decoder_args(0, None)["hw_decoder_load"] == load
    assert data.default_hw_decoder_load(None) == data.DALI_HW_DECODER_LOAD


@pytest.mark.parametrize("kwargs, message", [({"prefetch_depth": 0}, "prefetch_depth 0"),
                                             ({"prefetch_depth": True}, "prefetch_depth True"),
                                             ({"hw_decoder_load": 1.5}, "hw_decoder_load 1.5"),
                                             ({"hw_decoder_load": -0.5}, "hw_decoder_load -0.5")])
def test_loader_settings_are_checked(shards_dir, kwargs, message):
    for loader in (TrainLoader, data.ValLoader):
        with pytest.raises(ValueError, match=message):
            loader(shards_dir, 16, **kwargs)


def test_config_keys_are_checked_and_resume_safe():
    cfg = config.resolve("rn50", ["data.prefetch_depth=3", "data.hw_decoder_load=0.99"])
    assert (cfg.data.prefetch_depth, cfg.data.hw_decoder_load) == (3, 0.99)
    assert config.resolve("rn50").data.hw_decoder_load == data.HW_DECODER_LOAD_AUTO
    assert config.resolve("rn50").data.prefetch_depth == data.PREFETCH_DEPTH
    for bad in ("data.prefetch_depth=0", "data.hw_decoder_load=1.2", "data.hw_decoder_load=-0.5"):
        with pytest.raises(config.ConfigError, match=bad.split("=")[0]):
            config.resolve("rn50", [bad])
    assert {"data.prefetch_depth", "data.hw_decoder_load"} <= config.RESUME_SAFE


def test_the_fused_decoder_probe_runs_once_per_process_at_the_real_batch_size(shards_dir, monkeypatch):
    from train import decode_probe

    calls = []
    monkeypatch.setattr(decode_probe, "probe", lambda *a, **kw: calls.append(kw) or (False, "exit status 1"))
    monkeypatch.setattr(data, "_PROBED", {})
    shards = split_shards(shards_dir, "train")
    tars, idxs = [t for t, _ in shards], [i for _, i in shards]
    for batch_size in (96, 96, 32):
        loader = TrainLoader(shards_dir, batch_size)
        loader.device_id = 0  # as on a GPU: "auto" asks the probe (patched: no child process here)
        with pytest.warns(RuntimeWarning, match="failed a test run"):
            assert loader._resolve_decode(tars, idxs, 64) == "split"
    assert [(c["batch_size"], c["timeout"]) for c in calls] == [(96, 60.0), (32, 60.0)]


def test_the_pipeline_definitions_and_the_probe_do_not_import_the_loaders():
    """train.data -> train.decode_probe -> train.pipelines, never back: the probe's child process builds a
    pipeline without loading the epoch/rank machinery, and no import circle hides behind a function-level
    import."""
    import subprocess
    import sys

    code = ("import sys, train.pipelines, train.decode_probe; "
            "assert 'train.data' not in sys.modules, sorted(m for m in sys.modules if m.startswith('train'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from train import data, pipelines

    assert data.build_train_pipeline is pipelines.build_train_pipeline  # one definition, two names
