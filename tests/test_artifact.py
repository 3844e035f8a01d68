"""train.artifact: a run ends with model.safetensors + config.json that say how the model was built and
evaluated; copied anywhere (or loaded through torch.hub) the weights score the trainer's top-1 image by image;
a plain state_dict away from its run says in one line what it assumed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
from safetensors import safe_open

from preprocess.manifest import load_manifest
from tests.test_train import ROOT, metrics, run, train_cmd
from train import artifact, config, export
from train.model import build_model, load_model
from viz import gradcam, loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory):
    """One epoch of a BlurPool ResNet-18 (flip-TTA, val 64 px, as TINY sets them)."""
    out = tmp_path_factory.mktemp("artifact") / "run"
    proc = run(train_cmd(shards_dir, out, "--schedule.epochs=1", "--model.blurpool=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def evaluate(checkpoint, shards_dir, **flags):
    """viz's evaluation of `checkpoint` on the shards' val split with the settings the file carries."""
    setup = gradcam.prepare(str(checkpoint), num_classes=None, weights="auto", blurpool=flags.get("blurpool", "auto"),
                            flip_tta="auto", device="cpu", precision="auto", batch_size=None, res=None,
                            crop_ratio=None)
    data = gradcam.open_data(shards_dir)
    return setup, gradcam.run_evaluation(setup.model, data, res=setup.res, crop_ratio=setup.crop_ratio,
                                         batch_size=setup.batch_size, limit=None, threads=1, flip=setup.flip,
                                         amp_dtype=setup.amp_dtype, progress=False)


def test_run_writes_self_describing_weights(tiny_run, shards_dir):
    record = metrics(tiny_run)[-1]
    with safe_open(str(tiny_run / artifact.MODEL_FILE), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    card = {k: json.loads(v) for k, v in header.items() if k != "format"}
    assert card == json.loads((tiny_run / artifact.CARD_FILE).read_text())
    manifest = load_manifest(shards_dir)
    assert card["format_version"] == artifact.FORMAT_VERSION and card["architecture"] == "resnet18"
    assert card["blurpool"] is True and card["num_classes"] == manifest["num_classes"] == 10
    assert [c["name"] for c in card["classes"]] == [c["name"] for c in manifest["classes"]]
    assert [c["wnid"] for c in card["classes"]] == [c["wnid"] for c in manifest["classes"]]
    assert (card["val_res"], card["crop_ratio"], card["flip_tta"], card["val_batch_size"]) == (64, 0.875, True, 35)
    assert card["mean"] == [0.485, 0.456, 0.406] and card["std"] == [0.229, 0.224, 0.225]
    assert (card["top1"], card["top5"], card["epoch"]) == (record["top1"], record["top5"], 1)
    assert card["weights"] == "model" and len(card["commit"]) >= 7
    # no blur kernels in the file (non-persistent buffers), the same tensors as model_final.pth
    final = torch.load(tiny_run / "model_final.pth", weights_only=True)
    assert keys == set(final) and not any("blur" in k for k in keys)


@pytest.fixture(scope="module")
def in_run(tiny_run, shards_dir):
    """viz's predictions for best.pt inside its run folder: the trainer's top-1, image by image."""
    record = metrics(tiny_run)[-1]
    _, result = evaluate(tiny_run / "checkpoints" / "best.pt", shards_dir)
    assert result.top1 == record["top1"] and len(result.predictions) == record["val_images"]
    return result


def test_copied_files_score_the_trainers_top1_image_by_image(tiny_run, in_run, shards_dir, tmp_path, capsys):
    record = metrics(tiny_run)[-1]
    for name in (artifact.MODEL_FILE, "checkpoints/best.pt"):
        away = tmp_path / name.replace("/", "_") / (tiny_run / name).name
        away.parent.mkdir()
        shutil.copy(tiny_run / name, away)
        setup, copied = evaluate(away, shards_dir)
        assert setup.loaded.blurpool and (setup.res, setup.flip, setup.batch_size) == (64, True, 35), name
        assert [(p.key, p.predicted) for p in copied.predictions] == [(p.key, p.predicted) for p in in_run.predictions]
        assert copied.top1 == record["top1"], name
        names = [c["name"] for c in load_model(away).card["classes"]]  # the class names travel with the file
        assert names == [c["name"] for c in load_manifest(shards_dir)["classes"]], name
    assert "no settings stored" not in capsys.readouterr().out


def test_plain_state_dict_says_what_it_assumed(tiny_run, tmp_path, capsys):
    in_run = load_model(tiny_run / "model_final.pth")  # beside its run's config.json: BlurPool, quietly
    assert in_run.card["blurpool"] and capsys.readouterr().err == ""
    (tmp_path / "model_final.pth").write_bytes((tiny_run / "model_final.pth").read_bytes())
    alone = load_model(tmp_path / "model_final.pth")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"no settings stored with {tmp_path / 'model_final.pth'}: assuming resnet18 without BlurPool, val 224 px, " \
           f"crop 0.875, no flip-TTA" in err
    assert not any(type(m).__name__ == "BlurConv2d" for m in alone.modules())
    gradcam.prepare(str(tmp_path / "model_final.pth"), num_classes=None, weights="auto", blurpool="on",
                    flip_tta="auto", device="cpu", precision="auto", batch_size=None, res=64, crop_ratio=None)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "assuming crop 0.875, no flip-TTA (--blurpool, --res as given)" in out[0], out


def test_hub_load_gives_the_trainers_logits(tiny_run, tmp_path):
    last = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    trainer = build_model(config.config_from_dict(last["config"]).model, 10)
    trainer.load_state_dict(last["model"])
    trainer.eval()
    away = tmp_path / "elsewhere" / artifact.MODEL_FILE
    away.parent.mkdir()
    shutil.copy(tiny_run / artifact.MODEL_FILE, away)
    hub = torch.hub.load(str(ROOT), "model", str(away), source="local")
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer(images)
        assert torch.allclose(hub(images), expected, atol=1e-5, rtol=1e-4)
        assert hub.card["classes"][0]["name"] == load_manifest_name(tiny_run)
        plain = torchvision.models.resnet18(num_classes=10).eval()
        plain.load_state_dict(last["model"])  # loads without a word, and computes another function
        assert not torch.allclose(plain(images), expected, atol=1e-3)
    run_dir = torch.hub.load(str(ROOT), "model", str(tiny_run), source="local")  # a run folder: its safetensors
    assert run_dir.card["blurpool"] and run_dir.card["top1"] == metrics(tiny_run)[-1]["top1"]


def load_manifest_name(run_dir) -> str:
    return json.loads((run_dir / artifact.CARD_FILE).read_text())["classes"][0]["name"]


def test_weights_that_disagree_with_their_card_are_refused(tiny_run, tmp_path):
    from safetensors.torch import save_file

    with safe_open(str(tiny_run / artifact.MODEL_FILE), framework="pt") as f:
        header = f.metadata()
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    save_file(state, str(tmp_path / artifact.MODEL_FILE), metadata=header)  # a 10-class card on 3-class weights
    with pytest.raises(artifact.ArtifactError, match="card says resnet18 with 10 classes"):
        artifact.load(tmp_path / artifact.MODEL_FILE)


def exported_predictions(logits_of, card: dict, shards_dir) -> dict[str, int]:
    """{key: top-1} of an exported model over the val split, fed as the card says (flip-TTA: mirror added)."""
    data = gradcam.open_data(shards_dir)
    predicted = {}
    for batch in loader.batches(data, res=card["val_res"], crop_ratio=card["crop_ratio"],
                                batch_size=card["val_batch_size"]):
        images = batch.images.contiguous()
        logits = logits_of(images)
        if card["flip_tta"]:
            logits = logits + logits_of(torch.flip(images, dims=[3]).contiguous())
        predicted.update(zip(batch.keys, logits.argmax(dim=1).tolist()))
    return predicted


def test_export_onnx_and_pt2_predict_as_the_trainer(tiny_run, in_run, shards_dir, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime, onnxscript) "
                                                            "is not installed")
    assert export.main([str(tiny_run), "--out", str(tmp_path / "export")]) == 0
    assert "onnxruntime check" in capsys.readouterr().out
    card = json.loads((tmp_path / "export" / artifact.CARD_FILE).read_text())
    assert card == json.loads((tiny_run / artifact.CARD_FILE).read_text())
    expected = {p.key: p.predicted for p in in_run.predictions}
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert exported_predictions(lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]),
                                card, shards_dir) == expected
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["blurpool"]) is True and json.loads(meta["val_res"]) == 64
    program = torch.export.load(str(tmp_path / "export" / "model.pt2")).module()
    with torch.no_grad():
        assert exported_predictions(program, card, shards_dir) == expected
    copied = load_model(tmp_path / "export" / artifact.MODEL_FILE)
    assert copied.card == card


def test_export_refuses_bad_requests(tiny_run, tmp_path, capsys):
    assert export.main([str(tiny_run), "--out", str(tmp_path), "--format", "tflite"]) == 2
    assert "--format tflite: expected some of safetensors,onnx,pt2" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "nothing: no such file" in capsys.readouterr().err
