"""train.engine by its rules, in process and in seconds: which autocast dtype each precision setting picks,
the LR every step gets, the steps an epoch takes (a short last accumulation group left out, an early stop),
the meter's loss, first non-finite step and images/s, top-1/top-5 counting, and metrics.jsonl / summary.csv.
(Written for `make mutation MUTATE=engine`; docs/TESTING.md.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from train import engine

CPU = torch.device("cpu")


def test_pick_precision(monkeypatch):
    assert engine.pick_precision("fp32", "cuda") is None and engine.pick_precision("fp32", "cpu") is None
    assert engine.pick_precision("auto", "cpu") is None
    assert engine.pick_precision("bf16", "cpu") is torch.bfloat16 and engine.pick_precision("bf16", "cuda") is torch.bfloat16
    assert engine.pick_precision("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match=r"^run.precision=fp16 needs a GPU \(use fp32 or bf16 on the CPU\)$"):
        engine.pick_precision("fp16", "cpu")
    asked = []
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or native)
        assert engine.pick_precision("auto", "cuda") is (torch.bfloat16 if native else torch.float16)
    assert asked == [{"including_emulation": False}] * 2  # emulated bf16 is slow: fp16 then


def test_autocast_only_with_a_dtype():
    with engine.autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with engine.autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert nn.Linear(4, 2)(torch.randn(3, 4)).dtype is torch.bfloat16
    with engine.autocast("cpu", torch.float16):  # not the CPU's default autocast dtype
        assert torch.get_autocast_dtype("cpu") is torch.float16


class Recorder:
    """An optimizer with two param groups that records the LR of every step."""

    def __init__(self, params):
        self.inner = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
        self.param_groups = self.inner.param_groups
        self.lrs = []
        self.zeroed = []

    def zero_grad(self, set_to_none=False):
        self.zeroed.append(set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.lrs.append([g["lr"] for g in self.param_groups])
        self.inner.step()


class Ema:
    updates = 0

    def update(self):
        self.updates += 1


def epoch(n_batches, *, accum=1, first=0, stop_after=None, ema=None, loss_of=None, amp=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = Recorder(list(model.parameters()))
    batches = [(torch.randn(2 + (k % 2), 3, 2, 2), torch.tensor([0, 1, 2][:2 + (k % 2)])) for k in range(n_batches)]
    meter = engine.TrainMeter(CPU)
    seen = []

    def after_step(done):
        seen.append(done)
        return stop_after is not None and done >= stop_after

    stopped = engine.train_one_epoch(model, batches, optimizer, criterion=loss_of or nn.CrossEntropyLoss(),
                                     scaler=torch.amp.GradScaler("cpu", enabled=False), amp_dtype=amp, device=CPU,
                                     lr_at_step=lambda s: 0.1 * (s + 1), first_global_step=first, meter=meter,
                                     ema=ema, after_step=after_step, accum_steps=accum)
    return stopped, optimizer, meter, seen, model


def test_each_step_gets_the_lr_of_its_global_step_in_every_group():
    stopped, optimizer, meter, seen, model = epoch(5, first=10)
    assert not stopped and seen == [1, 2, 3, 4, 5]
    assert optimizer.lrs == [[pytest.approx(0.1 * (s + 1))] * 2 for s in range(10, 15)]
    assert optimizer.zeroed == [True] * 5
    assert model.training
    assert (meter.steps, meter.images) == (5, 2 + 3 + 2 + 3 + 2)


def test_accumulation_leaves_out_a_short_last_group_and_after_step_stops_the_epoch():
    ema = Ema()
    _, optimizer, meter, seen, _ = epoch(5, accum=2, ema=ema)
    assert len(optimizer.lrs) == 2 and seen == [1, 2] and (meter.steps, meter.images) == (2, 10) and ema.updates == 2
    stopped, optimizer, meter, seen, _ = epoch(5, stop_after=2)
    assert stopped is True and seen == [1, 2] and len(optimizer.lrs) == 2 and meter.steps == 2
    assert epoch(0)[0] is False and epoch(1, accum=2)[2].steps == 0


def test_meter_sums_the_losses_and_records_the_first_non_finite_step():
    losses = iter([1.0, float("nan"), 2.0, float("inf")])

    def loss_of(logits, labels):
        return (logits.sum() * 0 + next(losses)).squeeze()

    _, _, meter, _, _ = epoch(4, first=7, loss_of=loss_of)
    assert meter.first_bad.item() == 8
    meter = engine.TrainMeter(CPU)
    assert meter.first_bad.item() == -1 and meter.loss_sum.dtype is torch.float64
    meter.add(torch.tensor(1.5), 3, 4)
    meter.add(torch.tensor(2.25), 4, 4)
    meter.seconds, meter.steady_images, meter.steady_seconds = 2.5, 4, 2.0
    state = meter.state_dict()
    assert state == {"loss_sum": 3.75, "first_bad": -1, "steps": 2, "images": 8, "seconds": 2.5,
                     "steady_images": 4, "steady_seconds": 2.0}
    meter.add(torch.tensor(float("inf")), 6, 4)
    meter.add(torch.tensor(float("nan")), 7, 4)
    assert meter.first_bad.item() == 6 and (meter.steps, meter.images) == (4, 16)
    restored = engine.TrainMeter(CPU)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    old = {k: v for k, v in state.items() if not k.startswith("steady")}  # a checkpoint from before the steady rate
    restored.load_state_dict(old)
    assert (restored.steady_images, restored.steady_seconds) == (0, 0.0) and restored.images_per_second() == 8 / 2.5


def test_epoch_time_and_precision():
    import time

    def slow(n):
        for k in range(n):
            time.sleep(0.05)
            yield torch.randn(2, 3, 2, 2), torch.tensor([0, 1])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    meter = engine.TrainMeter(CPU)
    start = time.perf_counter()
    engine.train_one_epoch(model, slow(4), torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), amp_dtype=None, device=CPU,
                           lr_at_step=lambda s: 0.1, first_global_step=0, meter=meter)
    elapsed = time.perf_counter() - start
    assert 0.15 < meter.steady_seconds < meter.seconds <= elapsed  # steps 2-4, each waits 0.05 s for its batch
    low, full = epoch(3, amp=torch.bfloat16)[2], epoch(3)[2]
    assert low.loss_sum.item() != full.loss_sum.item()  # the forward ran in bf16
    assert low.loss_sum.item() == pytest.approx(full.loss_sum.item(), abs=0.1)


def test_images_per_second():
    meter = engine.TrainMeter(CPU)
    assert meter.state_dict() == {"loss_sum": 0.0, "first_bad": -1, "steps": 0, "images": 0, "seconds": 0.0,
                                  "steady_images": 0, "steady_seconds": 0.0}
    assert meter.images_per_second() == 0.0
    meter.images, meter.seconds = 10, 4.0
    assert meter.images_per_second() == 2.5
    meter.steady_images = 6
    assert meter.images_per_second() == 2.5  # no steady time: the plain average
    meter.steady_seconds = 1.5
    assert meter.images_per_second() == 4.0
    meter.steady_images = 0
    assert meter.images_per_second() == 2.5
    meter.images, meter.seconds = 3, 0.5  # under a second
    assert meter.images_per_second() == 6.0


class Scores(nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        assert not self.training
        return self.scores[images[:, 0, 0, 0].long()]


def test_evaluate_counts_top1_and_top5():
    scores = torch.tensor([[9., 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7]])
    images = torch.zeros(4, 3, 1, 1)
    images[2:, 0] = 1  # images 0, 1 score like row 0; 2, 3 like row 1
    model = Scores(scores).train()
    labels = torch.tensor([0, 4, 2, 1])  # top-1 hit, top-5 hit, top-5 hit, miss
    result = engine.evaluate(model, [(images[:2], labels[:2]), (images[2:], labels[2:])], device=CPU, amp_dtype=None,
                             flip_tta=False)
    assert result == {"top1": 0.25, "top5": 0.75, "images": 4}
    few = Scores(torch.tensor([[3., 2, 1]]))  # 3 outputs: top 3 is every class
    assert engine.evaluate(few.eval(), [(torch.zeros(2, 3, 1, 1), torch.tensor([0, 2]))], device=CPU, amp_dtype=None,
                           flip_tta=False) == {"top1": 0.5, "top5": 1.0, "images": 2}
    assert engine.evaluate(few, [], device=CPU, amp_dtype=None, flip_tta=False) == {"top1": 0.0, "top5": 0.0,
                                                                                  "images": 0}


def test_eval_logits_are_fp32_under_autocast():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.randn(2, 3, 2, 2)
    for flip in (False, True):
        low = engine.eval_logits(model, images, amp_dtype=torch.bfloat16, flip_tta=flip)
        full = engine.eval_logits(model, images, amp_dtype=None, flip_tta=flip)
        assert low.dtype is full.dtype is torch.float32
        assert not torch.equal(low, full) and torch.allclose(low, full, atol=0.1)  # computed in bf16, then widened


def test_metrics_log_rewrites_the_history_and_appends(tmp_path):
    history = [{"epoch": 0, "train_loss": 2.5, "top1": 0.125, "top5": 0.5, "lr": 0.1, "resolution": 160,
                "images_per_s": 100.0, "seconds": 3.0, "eval_seconds": 1.0},
               {"epoch": 1, "train_loss": 2.0, "lr": 0.2, "resolution": 160}]
    (tmp_path / "metrics.jsonl").write_text("stale\nlines\nthree\n")
    log = engine.MetricsLog(tmp_path, history, tensorboard=False, first_step=5)
    assert log.writer is None
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    header = "epoch,train_loss,eval_top1,eval_top5,lr,resolution,images_per_s,train_seconds,eval_seconds"
    assert (tmp_path / "summary.csv").read_text() == f"{header}\n0,2.5,12.5,50.0,0.1,160,100.0,3.0,1.0\n1,2.0,,,0.2,160,,,\n"
    log.append({"epoch": 2, "top1": 0.123456789, "lr": 0.0}, global_step=30)
    log.scalar("train/lr", 0.5, 31)  # no writer: nothing
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2]) == {"epoch": 2, "top1": 0.123456789, "lr": 0.0}
    assert (tmp_path / "summary.csv").read_text().splitlines()[-1] == "2,,12.3457,,0.0,,,,"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.csv"]  # no temp files left


def test_metrics_log_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = engine.MetricsLog(tmp_path, [], tensorboard=True, first_step=0)
    log.scalar("train/lr", 0.5, 3)
    log.append({"epoch": 1, "top1": 0.25, "note": "text", "resolution": 160}, global_step=7)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch/resolution", "epoch/top1", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(3, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("epoch/top1")] == [(7, 0.25)]


def test_train_step_is_one_sgd_step_on_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    reference = [p.detach().clone() for p in model.parameters()]
    expected_loss = nn.functional.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(expected_loss, list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = engine.train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(),
                             torch.amp.GradScaler("cpu", enabled=False), None)
    assert not loss.requires_grad and loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for p, p0, g in zip(model.parameters(), reference, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g)
    torch.manual_seed(0)
    again = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    low = engine.train_step(again, images, labels, torch.optim.SGD(again.parameters(), lr=0.5), nn.CrossEntropyLoss(),
                            torch.amp.GradScaler("cpu", enabled=False), torch.bfloat16)  # the forward in bf16
    assert low.item() != expected_loss.item() and low.item() == pytest.approx(expected_loss.item(), abs=0.05)


def test_accumulation_syncs_gradients_only_on_the_last_micro_batch():
    import contextlib

    class Ddp(nn.Sequential):
        """DDP's no_sync(): the backward passes inside it skip the all-reduce."""

        def __init__(self, *layers):
            super().__init__(*layers)
            self.log = []

        @contextlib.contextmanager
        def no_sync(self):
            self.log.append("no_sync")
            yield
            self.log.append("end")

        def forward(self, images):
            self.log.append("forward")
            return super().forward(images)

    model = Ddp(nn.Flatten(), nn.Linear(12, 3))
    micro = [(torch.randn(2, 3, 2, 2), torch.tensor([0, 1])) for _ in range(3)]
    engine.accumulated_step(model, micro, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                            torch.amp.GradScaler("cpu", enabled=False), None)
    assert model.log == ["no_sync", "forward", "end", "no_sync", "forward", "end", "forward"]
    model.log.clear()
    engine.train_step(model, *micro[0], torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      torch.amp.GradScaler("cpu", enabled=False), None)
    assert model.log == ["forward"]


def test_first_bad_step_zero_is_kept():
    meter = engine.TrainMeter(CPU)
    meter.add(torch.tensor(float("nan")), 0, 1)
    meter.add(torch.tensor(float("inf")), 1, 1)
    assert meter.first_bad.item() == 0


def test_a_resumed_log_purges_the_tensorboard_steps_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = engine.MetricsLog(tmp_path, [], tensorboard=True, first_step=0)
    for step in range(1, 7):
        first.scalar("train/lr", float(step), step)
    first.close()
    resumed = engine.MetricsLog(tmp_path, [], tensorboard=True, first_step=3)  # checkpoint at step 3
    resumed.scalar("train/lr", 50.0, 5)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(1, 1.0), (2, 2.0), (3, 3.0), (5, 50.0)]
