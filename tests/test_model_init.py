"""--model.init: a new run starts from given weights (weights only), with a new classifier when the class count
differs; torchvision's weights come only from the torch cache; a file of another architecture is refused."""

from __future__ import annotations

import pytest
import torch

from tests.test_train import metrics, run, train_cmd
from train import config
from train.model import build_model, init_weights


def resnet18(classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config.resolve("smoke", ["model.arch=resnet18", "model.blurpool=false"]).model, classes)


def test_weights_load_and_another_class_count_gets_a_new_head(tmp_path, capsys):
    source = resnet18(1000, seed=1)
    torch.save(source.state_dict(), tmp_path / "src.pth")
    target = resnet18(10, seed=2)
    head = target.fc.weight.clone()
    said = init_weights(target, str(tmp_path / "src.pth"), "resnet18")
    assert "a new classifier" in said and "start fresh" in said
    mine, theirs = target.state_dict(), source.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("fc."))
    assert torch.equal(target.fc.weight, head) and target.fc.weight.shape == (10, 512)
    same = resnet18(1000, seed=3)
    assert "its classifier too" in init_weights(same, str(tmp_path / "src.pth"), "resnet18")
    assert torch.equal(same.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="holds a resnet18, this run builds a resnet50"):
        init_weights(build_model(config.resolve("smoke").model, 10), str(tmp_path / "src.pth"), "resnet50")


def test_same_class_count_other_classes_gets_a_new_head(tmp_path):
    """Five classes there, five other classes here: the source's classifier would keep predicting its own
    classes under this data's labels, so it is replaced; the same classes in the same order keep it."""
    source = resnet18(5, seed=1)
    cfg = config.resolve("smoke", ["model.arch=resnet18", "model.blurpool=false"])
    there = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(5)]
    torch.save({"model": source.state_dict(), "config": config.to_dict(cfg), "classes": there}, tmp_path / "a.pt")
    here = [{"index": i, "wnid": f"n0000001{i}", "name": f"other {i}"} for i in range(5)]

    target = resnet18(5, seed=2)
    head = target.fc.weight.clone()
    said = init_weights(target, str(tmp_path / "a.pt"), "resnet18", here)
    assert "a new classifier: the source's classes are not this data's (class 0 is 'class 0' there, " \
           "'other 0' here)" in said
    assert torch.equal(target.fc.weight, head) and torch.equal(target.conv1.weight, source.conv1.weight)

    reordered = [there[1], there[0], *there[2:]]  # same classes, other order: other meanings per output
    assert "a new classifier" in init_weights(resnet18(5, seed=2), str(tmp_path / "a.pt"), "resnet18", reordered)

    same = resnet18(5, seed=3)
    said = init_weights(same, str(tmp_path / "a.pt"), "resnet18", [dict(c) for c in there])
    assert "its classifier too (the same classes in the same order)" in said
    assert torch.equal(same.fc.weight, source.fc.weight)

    torch.save(source.state_dict(), tmp_path / "plain.pth")  # a file that names no classes: kept, and said so
    said = init_weights(resnet18(5, seed=4), str(tmp_path / "plain.pth"), "resnet18", here)
    assert "the source names no classes: assumed to be this data's" in said


def test_torchvision_weights_only_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = resnet18(10, seed=2)
    with pytest.raises(ValueError, match="not in the torch cache and nothing is downloaded"):
        init_weights(target, "torchvision", "resnet18")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # the name torchvision uses
    cached.parent.mkdir(parents=True)
    source = resnet18(1000, seed=4)
    torch.save(source.state_dict(), cached)
    assert "torchvision ResNet18_Weights.IMAGENET1K_V1" in init_weights(target, "torchvision", "resnet18")
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_a_run_starts_from_the_weights(shards_dir, tmp_path):
    source = resnet18(1000, seed=5)
    torch.save(source.state_dict(), tmp_path / "src.pth")
    out = tmp_path / "run"
    # a vanishing learning rate: the trained weights stay the init's (BatchNorm statistics aside)
    proc = run(train_cmd(shards_dir, out, "--schedule.epochs=1", "--model.blurpool=false", "--optim.lr_per_256=1e-12",
                         f"--model.init={tmp_path / 'src.pth'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.init: weights from" in proc.stdout and "a new classifier" in proc.stdout
    trained = torch.load(out / "model_final.pth", weights_only=True)
    assert torch.allclose(trained["layer2.0.conv1.weight"], source.state_dict()["layer2.0.conv1.weight"], atol=1e-6)
    assert trained["fc.weight"].shape[0] == 10 and metrics(out)[-1]["epoch"] == 1
