"""The per-step GPU costs the review found, checked on the CPU: the EMA update in two multi-tensor ops, fused
SGD (same update as the multi-tensor one), DDP without buffer broadcasts and with bucket-view gradients,
and a logged images/s that leaves out the first (compile / warm-up) step."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from train import distributed, engine
from train.config import ModelConfig, OptimConfig
from train.model import ModelEma, build_model, build_optimizer


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_ema_update_lerps_weights_and_copies_buffers():
    model = tiny_model()
    ema = ModelEma(model, decay=0.9)
    reference = copy.deepcopy(ema.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 3, 8, 8))  # moves the BatchNorm statistics
    ema.update()
    decay = min(0.9, 2 / 11)
    for (name, got), want, new in zip(ema.module.named_parameters(), reference.parameters(), model.parameters()):
        assert torch.allclose(got, want + (1 - decay) * (new - want)), name
    for got, new in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(got, new) and got.data_ptr() != new.data_ptr()
    restored = ModelEma(tiny_model(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    with torch.no_grad():
        restored.source[0].weight.fill_(5.0)
    restored.update()  # still bound to its own model's tensors after loading
    assert not torch.equal(restored.module[0].weight, ema.module[0].weight)


def test_fused_sgd_matches_the_multi_tensor_update_and_is_off_on_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", blurpool=False), num_classes=5)
    twin = copy.deepcopy(model)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    results = []
    for net, fused in ((model, True), (twin, False)):
        optimizer = build_optimizer(net, OptimConfig(), lr=0.1, fused=fused)
        assert bool(optimizer.defaults["fused"]) is fused
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))
    assert not build_optimizer(model, OptimConfig(), lr=0.1).defaults["fused"]  # default: fused only on CUDA


def test_ddp_skips_buffer_broadcasts_and_uses_bucket_views(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = distributed.wrap_ddp(tiny_model(), "cpu", 0)
        assert not getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) and ddp.gradient_as_bucket_view
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
        assert all(p.grad is not None for p in ddp.parameters())
    finally:
        dist.destroy_process_group()


def test_logged_images_per_second_leaves_out_the_first_step():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def batches():
        for k in range(4):
            if k == 0:
                time.sleep(0.4)  # a first step that compiles or builds its pipeline
            yield torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))

    meter = engine.TrainMeter(torch.device("cpu"))
    engine.train_one_epoch(model, batches(), optimizer, criterion=nn.CrossEntropyLoss(),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), amp_dtype=None,
                           device=torch.device("cpu"), lr_at_step=lambda s: 0.01, first_global_step=0, meter=meter)
    assert meter.images == 32 and meter.steady_images == 24
    assert meter.seconds >= 0.4 and meter.seconds - meter.steady_seconds >= 0.4
    assert meter.images_per_second() == pytest.approx(24 / meter.steady_seconds)
    restored = engine.TrainMeter(torch.device("cpu"))
    restored.load_state_dict(meter.state_dict())
    assert restored.steady_images == 24 and restored.steady_seconds == meter.steady_seconds


def test_accumulating_two_half_batches_is_one_full_batch_step():
    """optim.accum_steps: N micro-batches of B give the weights of one batch of N x B (no BatchNorm here, whose
    statistics would see each micro-batch alone)."""
    from torch import nn

    from train import engine

    def run(batch_size: int, accum: int) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(1)
        images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, 16, batch_size)]
        meter = engine.TrainMeter(torch.device("cpu"))
        engine.train_one_epoch(model, batches, optimizer, criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
                               scaler=torch.amp.GradScaler("cpu", enabled=False), amp_dtype=None,
                               device=torch.device("cpu"), lr_at_step=lambda step: 0.5 / (1 + step),
                               first_global_step=0, meter=meter, accum_steps=accum)
        return {"weights": model.state_dict(), "steps": meter.steps, "images": meter.images,
                "loss": meter.loss_sum.item()}

    whole, halves = run(8, 1), run(4, 2)
    assert (whole["steps"], whole["images"]) == (halves["steps"], halves["images"]) == (2, 16)
    assert halves["loss"] == pytest.approx(whole["loss"], rel=1e-5)  # the mean loss of each step, logged the same
    for key, value in whole["weights"].items():
        torch.testing.assert_close(halves["weights"][key], value, rtol=1e-5, atol=1e-6)
    quarter = run(4, 1)["weights"]  # 4 steps of 4: another trajectory, so the comparison above can fail
    assert not torch.allclose(quarter["4.weight"], whole["weights"]["4.weight"], atol=1e-4)
    assert run(4, 3)["steps"] == 1  # 4 batches in groups of 3: the incomplete group is left out
