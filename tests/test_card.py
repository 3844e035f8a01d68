"""train.export --card: a Hugging Face model card that huggingface_hub's own parser reads (offline), whose
model-index holds the run's measured top-1/top-5 and names the validation set they come from, and that says so
when the run is a tiny synthetic one; --push-to-hub hands the folder to HfApi (mocked: never the network)."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from PIL import Image

from preprocess.manifest import load_manifest
from preprocess.sources import classes_json, imagenet_classes
from train import artifact, config, export
from train.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = [  # what train.main logs: the best epoch is not the last, the card is the last epoch's weights
    {"epoch": 1, "step": 12, "train_loss": 2.3, "top1": 0.4, "top5": 0.7, "val_images": 70, "seconds": 20.0},
    {"epoch": 2, "step": 24, "train_loss": 2.1, "top1": 0.342857, "top5": 0.657143, "val_images": 70, "seconds": 19.0},
]
COMMAND = "python -m train.main --data shards --out run --config smoke --model.arch=resnet18"


@pytest.fixture(scope="module")
def run_dir(shards_dir, tmp_path_factory):
    """A finished run's folder as train.main leaves it (config.yaml, metrics.jsonl, run.json, curves.png,
    model.safetensors + config.json), made with the trainer's own writers instead of a training run."""
    run = tmp_path_factory.mktemp("card") / "run"
    run.mkdir()
    cfg = config.resolve("smoke", ["model.arch=resnet18", "model.blurpool=true", "schedule.epochs=2", "val.res=64"])
    header = f"resolved config of this run; global batch 16 on 1 process(es), peak lr 0.05\ndata: {shards_dir}"
    (run / "config.yaml").write_text(config.dump_yaml(cfg, header))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (run / "run.json").write_text(json.dumps({"state": "finished", "command": COMMAND}))
    Image.new("RGB", (64, 32), (10, 120, 200)).save(run / "curves.png")
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    artifact.write_model_files(run, model, cfg, classes=load_manifest(shards_dir)["classes"], metrics=RECORDS[-1])
    return run


def test_card_parses_and_holds_the_runs_metrics(run_dir, tmp_path, capsys):
    grid = tmp_path / "elsewhere" / "mistakes.png"
    grid.parent.mkdir()
    Image.new("RGB", (48, 48), (200, 10, 10)).save(grid)
    out = tmp_path / "export"
    assert export.main([str(run_dir), "--out", str(out), "--format", "safetensors", "--card", "--gradcam",
                        str(grid)]) == 0
    assert "README.md" in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")  # huggingface_hub's own parser
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("pytorch", "image-classification", "other")
    assert {"image-classification", "resnet18", "blurpool", "safetensors"} <= set(data.tags)
    assert data.datasets is None  # a synthetic 10-class run: no claim on ImageNet-1k
    last = RECORDS[-1]
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == round(100 * last["top1"], 2)
    assert results["top_5_accuracy"].metric_value == round(100 * last["top5"], 2)
    for result in results.values():
        assert result.task_type == "image-classification" and result.dataset_split == "validation"
        assert "70 images" in result.dataset_name and "not ImageNet-1k" in result.dataset_name
        assert result.dataset_type == "custom"
    assert metadata_load(out / "README.md")["model-index"][0]["name"] == "imagenet-rn50-resnet18-run"
    body = card.text
    assert "Not an ImageNet-1k result" in body and "a small or synthetic run" in body
    assert "| 70 | 34.29 % | 65.71 % |" in body and "after epoch 2" in body
    assert "The best top-1 of the run was 40.00 % after epoch 1" in body
    assert "16 on 1 process(es)" in body and "(peak 0.05)" in body and "resnet18 with BlurPool" in body
    assert "10 classes, 200 train, 70 val images" in body  # from the shards' manifest.json
    assert "load_model(\"model.safetensors\")" in body and 'torch.hub.load(' in body
    assert f"`{COMMAND}`" in body
    assert "![training curves](curves.png)" in body and "(gradcam.png)" in body
    assert (out / "curves.png").read_bytes() == (run_dir / "curves.png").read_bytes()
    assert (out / "gradcam.png").read_bytes() == grid.read_bytes()
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert export.main([str(run_dir), "--out", str(out), "--format", "safetensors", "--card", "--curves",
                        str(tmp_path / "none.png")]) == 2
    assert "--curves " + str(tmp_path / "none.png") + ": no such file" in capsys.readouterr().err


def test_an_imagenet_run_names_imagenet_1k(run_dir, tmp_path):
    card = artifact.card_from_config(None, architecture="resnet50", num_classes=1000,
                                     classes=classes_json(imagenet_classes()),
                                     metrics={"top1": 0.76132, "top5": 0.92914, "val_images": 50_000, "epoch": 40})
    out = tmp_path / "export"
    out.mkdir()
    export.write_card(run_dir / artifact.MODEL_FILE, out, card, None, name="me/rn50")
    data = ModelCard.load(out / "README.md").data
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    (top1, top5) = data.eval_results
    assert (top1.metric_value, top5.metric_value) == (76.13, 92.91)
    assert top1.dataset_type == "ILSVRC/imagenet-1k" and top1.dataset_name == "ImageNet-1k validation (50,000 images)"
    assert "Not an ImageNet-1k result" not in (out / "README.md").read_text()
    card["val_images"] = 10_000  # a subset: still ImageNet-1k, but said to be a subset
    export.write_card(run_dir / artifact.MODEL_FILE, out, card, None, name="me/rn50")
    (top1, _) = ModelCard.load(out / "README.md").data.eval_results
    assert top1.dataset_name == "ImageNet-1k validation, 10,000 of 50,000 images"
    assert "Measured on part of ImageNet-1k's validation set" in (out / "README.md").read_text()
    card["classes"] = None  # a plain torchvision state_dict: 1000 outputs, but nothing says which classes
    export.write_card(run_dir / artifact.MODEL_FILE, out, card, None, name="me/rn50")
    data = ModelCard.load(out / "README.md").data
    assert data.datasets is None and "not known to be ImageNet-1k" in data.eval_results[0].dataset_name


class FakeApi:
    """HfApi's two calls, recorded; `fail` makes the upload raise as a network error would."""
    calls: list = []
    fail = False

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if FakeApi.fail:
            raise ConnectionError("cannot reach huggingface.co")
        FakeApi.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_to_hub_uploads_the_folder_with_its_card(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    FakeApi.calls, FakeApi.fail = [], False
    out = tmp_path / "export"
    assert export.main([str(run_dir), "--out", str(out), "--format", "safetensors", "--push-to-hub", "me/tiny",
                        "--private"]) == 0
    assert FakeApi.calls[0] == ("create_repo", "me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert FakeApi.calls[1][1]["folder_path"] == str(out) and FakeApi.calls[1][1]["repo_id"] == "me/tiny"
    assert metadata_load(out / "README.md")["model-index"][0]["name"] == "me/tiny"  # --push-to-hub implies --card
    printed = capsys.readouterr()
    assert "uploaded" in printed.out and "https://huggingface.co/me/tiny/commit/abc" in printed.out
    FakeApi.fail = True
    assert export.main([str(run_dir), "--out", str(out), "--format", "safetensors", "--push-to-hub", "me/tiny"]) == 4
    printed = capsys.readouterr()
    assert "--push-to-hub me/tiny: ConnectionError: cannot reach huggingface.co" in printed.err
    assert "hf_not_a_real_token_123" not in printed.out + printed.err
