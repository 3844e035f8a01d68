"""train.plan: the time and cost arithmetic, the labels saying how each rate was obtained (measured,
extrapolated, published, assumed), and the price table in docs/AWS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from train import plan

ROOT = Path(__file__).resolve().parents[1]
NO_BENCHMARKS = Path("/nonexistent/BENCHMARKS.md")

BENCHMARKS_MD = """\
# Benchmarks

## Preprocessing (2026-11-20, commit abc1234)
device: Intel Xeon, 2 cores; command: python -m benchmarks.preprocess

| workers | images | seconds | images/s | images/s per worker |
|---|---|---|---|---|
| 1 | 400 | 8.0 | 50.0 | 50.0 |
| 2 | 400 | 4.4 | 90.9 | 45.5 |

## End-to-end training (2026-12-01, commit def5678)
device: 8x NVIDIA A100-SXM4-40GB (p4d.24xlarge); command: torchrun --nproc_per_node=8 -m train.main ...

| gpu | gpus | epochs | images/s | top-1 |
|---|---|---|---|---|
| A100 | 8 | 2 | 19,000 | 10.1 |
| A100 | 8 | 24 | 20,000 | 75.7 |
"""


def test_training_time_and_cost_arithmetic():
    p = plan.estimate("rn50", 24, "a100", 8, benchmarks=NO_BENCHMARKS)
    rate = plan.TRAIN_IMAGES * 24 / (21.7 * 60)  # FFCV: 24 epochs in 21.7 min on 8xA100
    assert p.rate.images_per_s == pytest.approx(rate)
    assert p.epoch_s == pytest.approx(1_281_167 / rate + 50_000 / (plan.VAL_SPEEDUP * rate))
    phases = dict((name, s) for name, s, _ in p.phases)
    assert phases["training"] == pytest.approx(24 * p.epoch_s)
    assert phases["training"] == pytest.approx(21.7 * 60 * (1 + 50_000 / 3 / 1_281_167))  # FFCV's 21.7 min + val
    assert phases["sharding (one time)"] == pytest.approx(1_331_167 / (plan.SHARD_RATE_PER_VCPU * 96))
    assert p.total_s == pytest.approx(sum(phases.values()))
    hours = p.total_s / 3600
    assert p.cost(21.96) == pytest.approx(hours * (21.96 + plan.EBS_ROOT_PER_H + plan.CONTROLLER_PER_H))
    spot = p.cost(p.spot_price, interruptions=2)
    assert spot == pytest.approx((p.total_s + 2 * p.recovery_s) / 3600
                                 * (21.96 * plan.SPOT_FRACTION + plan.EBS_ROOT_PER_H + plan.CONTROLLER_PER_H))


def test_more_gpus_and_h100_scale_the_rate():
    a100 = plan.estimate(gpu="a100", gpus=8, benchmarks=NO_BENCHMARKS)
    h100 = plan.estimate(gpu="h100", gpus=8, benchmarks=NO_BENCHMARKS)
    two_nodes = plan.estimate(gpu="h100", gpus=16, benchmarks=NO_BENCHMARKS)
    assert h100.rate.images_per_s == pytest.approx(2 * a100.rate.images_per_s)  # H100 ~2x A100 per GPU
    assert two_nodes.rate.images_per_s == pytest.approx(2 * plan.MULTI_NODE_EFFICIENCY * h100.rate.images_per_s)
    assert two_nodes.nodes == 2
    hours = two_nodes.total_s / 3600
    assert two_nodes.cost(55.04) == pytest.approx(hours * (2 * (55.04 + plan.EBS_ROOT_PER_H) + plan.CONTROLLER_PER_H))


def test_cached_shards_skip_the_one_time_work():
    first = plan.estimate(benchmarks=NO_BENCHMARKS)
    again = plan.estimate(shards_cached=True, benchmarks=NO_BENCHMARKS)
    names = [name for name, _, _ in again.phases]
    assert "HF download (one time)" not in names and "shards from the S3 cache" in names
    assert again.total_s < first.total_s


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu": "a100", "gpus": 4}, "multiple of 8"),
    ({"gpu": "tpu"}, "expected one of"),
    ({"epochs": 0}, "at least 1"),
])
def test_bad_requests_are_explained(kwargs, message):
    with pytest.raises(plan.PlanError, match=message):
        plan.estimate(benchmarks=NO_BENCHMARKS, **kwargs)


def test_output_labels_assumptions(capsys):
    assert plan.main(["--preset", "rn50", "--epochs", "24", "--gpu", "a100", "--gpus", "8",
                      "--benchmarks", str(NO_BENCHMARKS)]) == 0
    out = capsys.readouterr().out
    assert "Training rate: 23,616 images/s  [PUBLISHED: FFCV's ResNet-50 run (8xA100" in out  # as it is
    assert "Sharding rate: 4,800 images/s  [ASSUMED" in out
    assert "MEASURED" not in out
    assert "assumed 0.5 x on-demand" in out and plan.PRICES_AS_OF in out and "not read live" in out
    on_demand = re.search(r"^on-demand\s+21\.96\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert on_demand, out
    expected = plan.estimate("rn50", 24, "a100", 8, benchmarks=NO_BENCHMARKS)
    assert float(on_demand.group(1)) == pytest.approx(expected.total_s / 3600, abs=0.005)
    assert float(on_demand.group(2)) == pytest.approx(expected.cost(21.96), abs=0.005)


def test_measured_rates_come_from_benchmarks_md(tmp_path, capsys):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(BENCHMARKS_MD)
    p = plan.estimate("rn50", 24, "a100", 8, benchmarks=bench)
    assert p.rate.measured and p.rate.images_per_s == pytest.approx(20_000)  # the last A100 row, on 8 GPUs as planned
    assert plan.estimate(gpu="h100", benchmarks=bench).rate.kind == "assumed"  # no H100 row
    plan.main(["--gpu", "a100", "--benchmarks", str(bench)])
    out = capsys.readouterr().out
    heading = "End-to-end training (2026-12-01, commit def5678)"
    assert f'[MEASURED here: BENCHMARKS.md, "{heading}": 20,000 images/s on 8x A100]' in out


def test_an_extrapolation_is_never_labelled_measured(tmp_path, capsys):
    """2 workers on a 2-core machine scaled to 96 vCPUs, and 8 GPUs scaled to 16, are extrapolations."""
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(BENCHMARKS_MD)
    p = plan.estimate("rn50", 24, "a100", 16, benchmarks=bench)
    assert (p.shard_rate.kind, p.shard_rate.measured) == ("extrapolated", False)
    assert p.shard_rate.images_per_s == pytest.approx(45.5 * 96)  # the last row: 2 workers, 45.5 each
    assert (p.rate.kind, p.rate.measured) == ("extrapolated", False)
    assert p.rate.images_per_s == pytest.approx(20_000 / 8 * 16 * plan.MULTI_NODE_EFFICIENCY)
    plan.main(["--gpu", "a100", "--gpus", "16", "--benchmarks", str(bench)])
    out = capsys.readouterr().out
    assert "Sharding rate: 4,368 images/s  [EXTRAPOLATED from 2 cores (2 workers): BENCHMARKS.md, " in out
    assert "Training rate: 36,000 images/s  [EXTRAPOLATED from 8 GPUs: BENCHMARKS.md, " in out
    assert "MEASURED" not in out and "(extrapolated)" in out and "(extrapolated rate)" in out
    # A one-process table (benchmarks.preprocess's encoder comparison has no workers column) is 1 worker.
    bench.write_text("## Preprocessing encoder\n\n**date**, device: AMD EPYC, 4 cores  \n`cmd`\n\n"
                     "| encoder | images/s per worker |\n|---|---|\n| auto | 60.0 |\n")
    shard = plan.estimate(gpu="a100", benchmarks=bench).shard_rate
    assert shard.kind == "extrapolated" and shard.source.startswith("EXTRAPOLATED from 4 cores (1 worker): ")


def test_every_rate_says_how_it_was_obtained(capsys):
    kinds = {}
    for gpu, gpus in (("a100", 8), ("a100", 16), ("h100", 8), ("l40s", 1)):
        p = plan.estimate(gpu=gpu, gpus=gpus, benchmarks=NO_BENCHMARKS)
        kinds[gpu, gpus] = p.rate.kind
        assert p.rate.source.split(":")[0].split()[0] == p.rate.kind.upper() and p.shard_rate.kind == "assumed"
    assert kinds == {("a100", 8): "published", ("a100", 16): "extrapolated", ("h100", 8): "assumed",
                     ("l40s", 1): "assumed"}
    with pytest.raises(ValueError, match="expected one of measured"):
        plan.Rate(1.0, "guessed", "")


def test_epochs_default_to_the_preset(capsys):
    plan.main(["--preset", "rn50", "--benchmarks", str(NO_BENCHMARKS)])
    assert capsys.readouterr().out.startswith("Plan: rn50, 24 epochs on 8x A100")
    with pytest.raises(SystemExit):
        plan.main(["--preset", "no-such-preset"])


def test_price_table_in_docs_matches_the_plan():
    """docs/AWS.md shows the prices train.plan uses; a price updated in one place only fails here."""
    text = (ROOT / "docs" / "AWS.md").read_text()
    rows = {r["instance"]: r for _, _, rows in plan.markdown_tables(text) for r in rows if "instance" in r}
    for inst in plan.INSTANCES.values():
        row = rows[inst.name]
        assert float(row["on-demand $/h"]) == pytest.approx(inst.on_demand), inst.name
        assert row["gpus"].startswith(f"{inst.gpus}x")
        assert int(row["vcpus"]) == inst.vcpus
    assert plan.PRICES_AS_OF in text
