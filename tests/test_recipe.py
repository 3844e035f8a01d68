"""The recipe by its definitions, not by "it runs": which tensors get weight decay, BlurPool's swap rule and
filter, EMA's update against numbers worked out by hand, flip TTA as the mean of the two views, and the
loss, optimizer and LR function that train.main really hands to the training loop (smoothing 0.1 included).

Each test here was checked by planting the bug it names in a copy of the code (docs/TESTING.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train import engine, schedule
from train.config import ModelConfig, OptimConfig
from train.model import BlurConv2d, ModelEma, add_blurpool, build_model, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16  # [1,2,1] x [1,2,1] / 16


# ----------------------------------------------------------------------------- weight decay

def decay_split(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[set[str], set[str]]:
    """Names of the parameters in the optimizer's groups with and without weight decay."""
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, free = set(), set()
    for group in optimizer.param_groups:
        (decayed if group["weight_decay"] > 0 else free).update(names[id(p)] for p in group["params"])
    return decayed, free


def expected_decay(model: nn.Module) -> tuple[set[str], set[str]]:
    """By module type: conv and linear weights decay; BatchNorm weights and biases and all biases do not."""
    decayed, free = set(), set()
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                decayed.add(full)
            elif isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                free.add(full)
            else:
                raise AssertionError(f"unexpected parameter {full} of {type(module).__name__}")
    return decayed, free


def test_weight_decay_only_on_conv_and_linear_weights():
    model = build_model(ModelConfig(arch="resnet50", blurpool=True), num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=5e-5, momentum=0.9), lr=0.3)
    decayed, free = decay_split(model, optimizer)
    want_decayed, want_free = expected_decay(model)
    assert decayed == want_decayed and free == want_free
    assert "bn1.weight" in free and "layer1.0.bn3.bias" in free and "fc.bias" in free and "fc.weight" in decayed
    assert len(decayed) == 54 and len(free) == 107  # 53 convs + fc; 53 BatchNorms x 2 + fc.bias
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 5e-5]
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["dampening"] == 0 and g["lr"] == 0.3
               for g in optimizer.param_groups)


def test_weight_decay_moves_conv_weights_but_not_batchnorm():
    """One SGD step with zero gradients: only weight decay moves the weights (w -= lr x wd x w)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, momentum=0.0), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {n: float(p.detach().flatten()[0]) for n, p in model.named_parameters()}
    assert moved == {"0.weight": pytest.approx(2 - 0.5 * 0.1 * 2), "0.bias": 2.0, "1.weight": 2.0, "1.bias": 2.0,
                     "3.weight": pytest.approx(1.9), "3.bias": 2.0}


# ----------------------------------------------------------------------------- BlurPool

def blurred_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BlurConv2d)}


def test_blurpool_swaps_exactly_the_strided_convs_after_the_stem():
    model = build_model(ModelConfig(arch="resnet50", blurpool=True), num_classes=10)
    # torchvision's ResNet-50 (v1.5) strides in each stage's first 3x3 conv and its 1x1 shortcut.
    assert blurred_names(model) == {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")}
    assert type(model.conv1) is nn.Conv2d  # the RGB stem (3 input channels, stride 2) keeps its aliasing
    plain = build_model(ModelConfig(arch="resnet50", blurpool=False), num_classes=10)
    assert blurred_names(plain) == set() and model.state_dict().keys() == plain.state_dict().keys()
    small = build_model(ModelConfig(arch="resnet18", blurpool=True), num_classes=10)
    assert blurred_names(small) == {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")}


def test_blurpool_rule_at_its_boundaries():
    convs = nn.Sequential(nn.Conv2d(15, 8, 3, stride=2), nn.Conv2d(16, 8, 3, stride=2), nn.Conv2d(64, 8, 3),
                          nn.Conv2d(16, 8, 3, stride=(1, 2)), nn.Conv2d(3, 8, 7, stride=2))
    weights = [c.weight for c in convs]
    assert add_blurpool(convs) == 2
    assert [type(c) is BlurConv2d for c in convs] == [False, True, False, True, False]
    assert all(c.weight is w for c, w in zip(convs, weights))  # the same parameters, not copies
    assert add_blurpool(convs) == 0  # a BlurConv2d is not wrapped again


def test_blur_filter_is_the_normalised_binomial():
    conv = nn.Conv2d(16, 16, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(16)[:, :, None, None])  # a 1x1 identity: the output is the blurred input
    blur = BlurConv2d.from_conv(conv)
    assert blur.blur_kernel.shape == (16, 1, 3, 3) and all(torch.equal(k[0], BINOMIAL) for k in blur.blur_kernel)
    assert "blur_kernel" not in blur.state_dict()
    impulse = torch.zeros(1, 16, 7, 7)
    impulse[0, :, 3, 3] = 1.0
    expected = torch.zeros(7, 7)
    expected[2:5, 2:5] = BINOMIAL
    out = blur(impulse)
    assert all(torch.allclose(out[0, c], expected) for c in range(16))
    flat = torch.full((1, 16, 7, 7), 3.0)
    assert torch.allclose(blur(flat)[0, :, 1:-1, 1:-1], torch.full((16, 5, 5), 3.0))  # sums to 1


def test_blurred_strided_conv_is_blur_then_the_same_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 12, 12)
    blurred = nn.functional.conv2d(x, BINOMIAL.expand(16, 1, 3, 3), padding=1, groups=16)
    assert torch.allclose(BlurConv2d.from_conv(conv)(x), conv(blurred), atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_blurpool_keeps_dilation_groups_padding_mode_and_bias(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=bias, padding_mode="reflect")
    blur = BlurConv2d.from_conv(conv)
    assert (blur.dilation, blur.groups, blur.padding_mode) == ((2, 2), 2, "reflect") and (blur.bias is None) != bias
    x = torch.randn(2, 16, 12, 12)
    blurred = nn.functional.conv2d(x, BINOMIAL.expand(16, 1, 3, 3), padding=1, groups=16)
    assert torch.allclose(blur(x), conv(blurred), atol=1e-6)


def test_build_model_sizes_the_head_and_zero_inits_the_residual_gammas():
    model = build_model(ModelConfig(arch="resnet50", blurpool=False, zero_init_residual=True), num_classes=7)
    assert model.fc.out_features == 7
    last_gammas = [block.bn3.weight for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                   for block in stage]
    assert len(last_gammas) == 16 and all(torch.count_nonzero(g) == 0 for g in last_gammas)
    plain = build_model(ModelConfig(arch="resnet50", blurpool=False, zero_init_residual=False), num_classes=7)
    assert all(torch.all(block.bn3.weight == 1) for block in plain.layer1)


def test_plain_state_dict_is_a_contiguous_cpu_copy():
    from train.model import plain_state_dict

    model = build_model(ModelConfig(arch="resnet18", blurpool=True), num_classes=3)
    model = model.to(memory_format=torch.channels_last)
    plain = plain_state_dict(model)
    assert plain.keys() == model.state_dict().keys()
    assert not model.conv1.weight.is_contiguous() and all(t.is_contiguous() and t.device.type == "cpu"
                                                          for t in plain.values())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    assert plain["conv1.weight"].data_ptr() != model.conv1.weight.data_ptr()
    assert not any(t.requires_grad for t in plain.values())


# ----------------------------------------------------------------------------- EMA

class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))


def test_ema_update_against_a_hand_computation():
    """decay_n = min(decay, (1 + n) / (10 + n)); ema <- decay_n x ema + (1 - decay_n) x w.
    From ema = 0 with w = 1, 2, 3: 9/11, then 1/4 x 9/11 + 3/4 x 2 = 75/44, then 4/13 x 75/44 + 9/13 x 3 = 372/143."""
    model = Scalar()
    ema = ModelEma(model, decay=0.99)
    got = []
    for w in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.w.fill_(w)
            model.count.fill_(10 * w)
        ema.update()
        got.append(ema.module.w.item())
        assert ema.module.count.item() == 10 * w  # buffers are copied, not averaged
    assert got == pytest.approx([9 / 11, 75 / 44, 372 / 143], rel=1e-12)
    assert not any(p.requires_grad for p in ema.module.parameters())  # a copy to average into, not to train
    ema.updates = 10_000  # (1 + n) / (10 + n) > 0.99: the configured decay caps it
    with torch.no_grad():
        model.w.fill_(103.0)
    ema.update()
    assert ema.module.w.item() == pytest.approx(0.99 * 372 / 143 + 0.01 * 103, rel=1e-12)
    assert model.w.item() == 103.0 and ema.updates == 10_001


# ----------------------------------------------------------------------------- flip TTA

def test_flip_tta_scores_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)).eval()
    images = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        one, mirror, upside = model(images), model(images.flip(3)), model(images.flip(2))
    labels = ((one + mirror) / 2).argmax(1)
    assert torch.allclose(engine.eval_logits(model, images, amp_dtype=None, flip_tta=True), one + mirror, atol=1e-5)
    evaluate = lambda flip: engine.evaluate(model, [(images, labels)], device=torch.device("cpu"),  # noqa: E731
                                            amp_dtype=None, flip_tta=flip)
    assert evaluate(True)["top1"] == 1.0 and evaluate(True)["images"] == 64
    # Preconditions that make the check mean something: neither one view nor an upside-down mirror gets there.
    assert evaluate(False)["top1"] < 0.9 and (one.argmax(1) == labels).float().mean() < 0.9
    assert ((one + upside).argmax(1) == labels).float().mean() < 0.9


# ----------------------------------------------------------------------------- what train.main hands the loop

class _Captured(Exception):
    pass


TRAINER_ARGS = ["--config", "smoke", "--model.arch=resnet18", "--data.batch_size=16", "--data.num_threads=1",
                "--val.batch_size=35", "--schedule.epochs=5", "--schedule.warmup_epochs=1.5",
                "--run.tensorboard=false", "--run.device=cpu", "--run.threads=1", "--ema.enabled=true",
                "--ema.decay=0.75", "--optim.weight_decay=3e-5"]


@pytest.fixture(scope="module")
def handed(shards_dir, tmp_path_factory):
    """The keyword arguments train.main passes to engine.train_one_epoch for the first epoch (in-process,
    stopped there: the model, its optimizer, the loss, the LR function and the EMA as the trainer built them)."""
    from train import main

    seen = {}

    def capture(model, batches, optimizer, **kwargs):
        seen.update(kwargs, model=model, optimizer=optimizer)
        raise _Captured

    out = tmp_path_factory.mktemp("handed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", capture)
        with pytest.raises(_Captured):
            main.main(["--data", str(shards_dir), "--out", str(out), *TRAINER_ARGS])
    return seen


def test_trainer_loss_is_cross_entropy_with_label_smoothing_0_1(handed):
    """loss = (1 - eps) x (-log p_label) + eps x mean over classes of (-log p_c), eps = 0.1 (smoke keeps rn50's)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10) * 3, torch.tensor([0, 3, 9, 1, 1, 7])
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p[torch.arange(6), labels]
    smoothed = (0.9 * nll - 0.1 * log_p.mean(dim=1)).mean()
    got = handed["criterion"](logits, labels)
    assert got.item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert got.item() != pytest.approx(nll.mean().item(), rel=1e-3)  # not the plain cross-entropy


def test_trainer_optimizer_decays_only_conv_and_linear_weights(handed):
    model, optimizer = handed["model"], handed["optimizer"]
    assert decay_split(model, optimizer) == expected_decay(model)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 3e-5]
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in optimizer.param_groups)


def test_trainer_lr_function_is_the_schedule_at_the_global_step(handed):
    steps_per_epoch = 200 // 16  # the fixture's 200 train images, whole batches of 16
    peak = 0.2 * 16 / 256  # smoke's lr_per_256 at a global batch of 16
    assert handed["first_global_step"] == 0 and handed["lr_at_step"](0) == pytest.approx(peak * 1e-4)
    for step in range(5 * steps_per_epoch + 2):
        want = schedule.lr_at(step, steps_per_epoch=steps_per_epoch, peak=peak, warmup_epochs=1.5, epochs=5,
                              start_factor=1e-4)
        assert handed["lr_at_step"](step) == pytest.approx(want, rel=1e-12, abs=0), step
    assert handed["lr_at_step"](18) == pytest.approx(peak)  # 1.5 epochs of 12 steps


def test_trainer_ema_and_blurpool_follow_the_config(handed):
    ema, model = handed["ema"], handed["model"]
    assert isinstance(ema, ModelEma) and ema.decay == 0.75 and ema.source is model and ema.updates == 0
    assert blurred_names(model) == {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")}
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))
