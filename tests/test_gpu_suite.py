"""benchmarks.gpu_suite on the CPU: the whole quick profile's CPU dry run passes (every stage ok, so a change to a
preset, a metrics field or the trainer's run folder cannot break the GPU run unnoticed; ~3 minutes on 2 cores),
a failing or hanging stage does not stop the others, --deadline-s plans the stages to end before it, the export
(summary, results, logs archive) is refreshed after every stage, a missing data part falls back to toy shards
without taking the photo-shard stages down, train-main's checks follow the preset's validation epochs, and the
goals are judged from the stages' rows."""

from __future__ import annotations

import json
import re
import sys
import tarfile

import pytest

from benchmarks import carry_data, gpu_suite
from benchmarks.toydata import write_image_folders


def test_a_failed_and_a_hung_stage_are_recorded_and_later_stages_still_run(tmp_path):
    suite = gpu_suite.Suite(tmp_path / "out", "cpu", "quick", None, tmp_path / "carry", "abc1234")
    suite.sizes.budgets.update({"fails": 30, "hangs": 6, "works": 30})
    suite.stage("fails", lambda r: suite.run_commands(r, [[sys.executable, "-c", "raise SystemExit('broken input')"]]))
    suite.stage("hangs", lambda r: suite.run_commands(r, [[sys.executable, "-c", "import time; time.sleep(60)"]]))
    suite.stage("works", lambda r: suite.run_commands(r, [[sys.executable, "-c", "print('fine')"]]))
    suite.stage("raises", lambda r: {}["missing"])
    status = {r.name: r.status for r in suite.results}
    assert status == {"fails": "failed", "hangs": "timeout", "works": "ok", "raises": "failed"}
    by_name = {r.name: r for r in suite.results}
    assert "broken input" in by_name["fails"].detail and by_name["hangs"].seconds < 30
    assert "fine" in (suite.out / "logs" / "works.log").read_text()
    saved = json.loads((suite.out / "results.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["fails", "hangs", "works", "raises"]


def test_goals_are_judged_from_the_rows():
    rows = lambda kind, rates: [{"step": kind, "res": r, "images/s": v, "compile": False}  # noqa: E731
                                for r, v in rates.items()]
    stages = {
        "dali": gpu_suite.StageResult("dali", figures={"rows": [
            {"pipeline": "dali-gpu", "res": 160, "threads": 6, "images/s": 16000.0},
            {"pipeline": "dali-gpu", "res": 192, "threads": 6, "images/s": 9000.0},
            {"pipeline": "dali-gpu", "res": 192, "threads": 8, "images/s": 99000.0},  # > 6 threads: not counted
            {"pipeline": "dali-gpu", "res": 192, "threads": 6, "images/s": 8500.0, "hw decoder load": 0.99},
            {"pipeline": "pipeline-build dali-gpu", "shards": 1281, "threads": 6, "build s": 0.06,
             "first batch s": 1.2, "other Python thread during build, % of its speed": 95.0},  # not a rate
            {"pipeline": "torchvision-dataloader", "res": 160, "threads": 6, "images/s": 2000.0}]}),
        "train-step": gpu_suite.StageResult("train-step", figures={"rows": rows("ours", {160: 9000.0, 192: 8000.0, 224: 5000.0})
                                                                  + rows("reference", {160: 5000.0, 192: 5000.0, 224: 3000.0})}),
        "train-step-compiled": gpu_suite.StageResult("train-step-compiled", figures={"rows": [
            {"step": "ours", "res": 160, "images/s": 12000.0, "compile": True}]}),
        "train-main": gpu_suite.StageResult("train-main", figures={"pipeline_ready": [
            {"epoch": int(m.group(1)), "wait_s": float(m.group(2)), "ahead": bool(m.group(3))}
            for m in gpu_suite.PIPELINE_READY.finditer(
                "epoch 1: input pipeline ready in 3.10 s\nepoch 2: input pipeline ready in 0.01 s, built during "
                "the previous validation\nepoch 2: input pipeline ready in 2.50 s\n")]}),  # the last: resumed
    }
    figures = gpu_suite.collect_figures(stages, "NVIDIA H200")
    goals = {g["goal"].split(" (")[0]: (g["value"], g["status"]) for g in figures["goals"]}
    assert goals["our step >= 6,000 images/s at 224 px"] == ("5,000", "missed")
    assert goals["our step >= 11,000 images/s at 160 px"] == ("12,000", "met")  # the compiled rate counts
    assert goals["ours >= 1.5x the reference step"] == ("1.60x", "met")
    assert goals["DALI mixed >= 1.3x our step at 160 px, <= 6 threads"] == ("1.33x", "met")
    assert goals["DALI mixed >= 1.3x our step at 192 px, <= 6 threads"] == ("1.12x", "missed")
    assert goals["next epoch's pipeline ready before validation ends"] == ("waited 0.01 s", "met")
    step = figures["step"]["ours compiled 160 px"]
    assert step["peak TFLOP/s"] == 989.0  # one H200 peak, the datasheet's, as benchmarks.train_step's
    assert step["% of peak"] == pytest.approx(100 * 12000 * 24.6 * (160 / 224) ** 2 / 1000 / 989, abs=0.1)
    assert "% of the datasheet's 989" in "\n".join(gpu_suite.figure_lines(figures))
    assert all(g["status"] == "n/a" for g in gpu_suite.collect_figures(stages, "NVIDIA A100")["goals"][:2])
    assert figures["dali"]["dali-gpu 192 px 6 thr hw_decoder_load 0.99"] == 8500.0  # its own row, beside 9,000
    assert figures["dali"]["dali-gpu 192 px 6 thr"] == 9000.0
    assert figures["build"]["dali-gpu pipeline over 1281 shards"]["first batch s"] == 1.2
    assert "| dali-gpu pipeline over 1281 shards: build s, first batch s" in "\n".join(gpu_suite.figure_lines(figures))


QUICK_STAGES = ["env", "data", "gpu-tests", "dali", "train-step", "train-main", "train-step-compiled",
                "train-main-compiled"]


def test_the_quick_cpu_dry_run_passes_every_stage_and_exports_what_a_gpu_run_would(tmp_path):
    """The suite's CPU dry run, as `python -m benchmarks.gpu_suite --device cpu --profile quick` runs it."""
    out, export = tmp_path / "suite", tmp_path / "export"
    code = gpu_suite.main(["--out", str(out), "--device", "cpu", "--profile", "quick", "--export", str(export),
                           "--carry", str(tmp_path / "no-parts"), "--commit", "abc1234"])
    results = json.loads((out / "results.json").read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in results["stages"]}
    assert [s["name"] for s in results["stages"]] == QUICK_STAGES
    assert all(st == "ok" for st, _ in status.values()) and code == 0, (out / "summary.md").read_text()
    assert results["environment"]["commit"] == "abc1234" and results["suite"]["data"]["shards_kind"] == "toy"
    stages = {s["name"]: s for s in results["stages"]}
    assert stages["gpu-tests"]["figures"]["tests"] >= 10 and stages["gpu-tests"]["figures"]["failures"] == 0
    assert {r["pipeline"] for r in stages["dali"]["figures"]["rows"]} >= {"dali-cpu", "dali-cpu-split",
                                                                          "pipeline-build dali-cpu"}
    assert {r["step"] for r in stages["train-step"]["figures"]["rows"]} == {"ours", "reference"}
    assert [r["compile"] for r in stages["train-step-compiled"]["figures"]["rows"]] == [True]
    tm = stages["train-main"]["figures"]
    # the smoke preset validates every 2nd epoch: of 2 epochs, only the 2nd has a top-1
    assert tm["run1_exit"] == 75 and tm["run2_exit"] == 0 and tm["stopped_at"] == {"epoch": 2, "step": 1}
    assert tm["validated_epochs"] == [2] and ["top1" in e for e in tm["epochs"]] == [False, True]
    assert tm["run_state"] == "finished" and {"model.safetensors", "config.json"} <= set(tm["model_files"])
    assert "| train-main | ok |" in (out / "summary.md").read_text()
    # the compiled run: one resolution (one graph), run to the end, the same run-folder checks
    tc = stages["train-main-compiled"]["figures"]
    assert "--model.compile=true" in tc["command"] and tc["run_state"] == "finished"
    assert [e["epoch"] for e in tc["epochs"]] == [1, 2] and {e["resolution"] for e in tc["epochs"]} == {64}
    assert all(e["images_per_s"] > 0 for e in tc["epochs"]) and "top1" in tc["epochs"][1]
    compiled_rows = results["figures"]["train_main_compiled"]["epochs"]
    assert [e["epoch"] for e in compiled_rows] == [1, 2]
    assert "| train.main compiled epoch 2 (64 px) |" in (out / "summary.md").read_text()
    assert "commit `abc1234`" in (out / "BENCHMARKS.md").read_text()
    assert sorted(p.name for p in export.iterdir()) == ["BENCHMARKS.md", "gpu-suite.tar.gz", "results.json",
                                                        "summary.md"]
    with tarfile.open(export / "gpu-suite.tar.gz") as tar:
        names = tar.getnames()
        biggest = max(m.size for m in tar.getmembers())
    assert {f"gpu-suite/logs/{s}.log" for s in QUICK_STAGES[2:]} <= set(names)
    assert "gpu-suite/train-main/run/metrics.jsonl" in names and biggest <= gpu_suite.ARCHIVE_FILE_LIMIT
    assert not [n for n in names if n.endswith(gpu_suite.BULKY)]  # no shards, images, checkpoints or weights


def test_train_main_checks_follow_the_presets_validation_epochs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# resolved config\nschedule:\n  epochs: 4\nval:\n  every_epochs: 3\n")
    (run / "run.json").write_text(json.dumps({"state": "finished"}))
    (run / "model.safetensors").write_bytes(b"x")
    (run / "config.json").write_text("{}")
    metrics = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "top1": 0.5}, {"epoch": 4, "top1": 0.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    log = ("epoch 1/4: res 32 px, 6 steps of 16 images\nepoch 2: input pipeline ready in 0.01 s, built during x\n"
           "stopped by SIGTERM: /r/checkpoints/last.pt (epoch 2, step 1); run the same command to resume (exit 75)\n"
           "resuming from /r/checkpoints/last.pt (epoch 2, step 1)\n")
    figures = gpu_suite.train_main_figures(log, run)
    assert figures["validated_epochs"] == [3, 4] and figures["stopped_at"] == {"epoch": 2, "step": 1}
    assert figures["steps_per_epoch"] == 6 and gpu_suite.train_main_problems(figures, 0) == []

    metrics[3].pop("top1")  # the last epoch always validates
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics[:3]) + json.dumps(metrics[3]))
    (run / "model.safetensors").unlink()
    (run / "run.json").write_text(json.dumps({"state": "stopped"}))
    problems = gpu_suite.train_main_problems(gpu_suite.train_main_figures(log.replace("resuming", "x"), run), 0)
    assert [p.split(" ")[0:3] for p in problems] == [["run", "2", "exit"], ["no", "top-1", "in"],
                                                     ["run.json", "says", "'stopped',"], ["the", "finished", "run"]]
    assert "epoch(s) [4]" in problems[1] and "model.safetensors" in problems[3]


def test_stages_are_planned_to_end_before_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "MIN_STAGE_S", 1.0)
    gpu_suite.collect_figures({}, "")  # imports torch now, not inside the first stage's bookkeeping (~2 s of 6)
    suite = gpu_suite.Suite(tmp_path / "out", "cpu", "quick", None, tmp_path / "carry", "abc1234", deadline_s=6)
    suite.sizes.budgets.update({"works": 10, "hangs": 10, "last": 10, "after": 10})
    suite.pending = ["works", "hangs", "last"]  # what run() would plan; "after" comes unplanned
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    suite.stage("works", lambda r: suite.run_commands(r, [[sys.executable, "-c", "print('fine')"]]))
    suite.stage("hangs", lambda r: suite.run_commands(r, [hang]))
    suite.stage("last", lambda r: suite.run_commands(r, [hang]))
    suite.stage("after", lambda r: suite.run_commands(r, [hang]))
    by_name = {r.name: r for r in suite.results}
    assert by_name["works"].status == "ok" and by_name["works"].budget_s == pytest.approx(10 * 6 / 30, abs=0.3)
    # each stage gets its share of what is left (its budget x time left / the budgets still to run), not 10 s;
    # the last planned one gets the rest
    left = 6 - by_name["works"].seconds
    assert by_name["hangs"].status == "timeout" and by_name["hangs"].budget_s == pytest.approx(left / 2, abs=0.5)
    assert by_name["last"].status == "timeout" and by_name["last"].budget_s == pytest.approx(left / 2, abs=0.5)
    assert by_name["after"].status == "skipped" and "left before the suite's deadline of 6 s" in by_name["after"].detail
    assert sum(r.seconds for r in suite.results) <= 6 + 1.0


def test_a_missing_data_part_falls_back_to_toy_shards_and_keeps_the_photo_shards(tmp_path):
    src = write_image_folders(tmp_path / "photos", classes=3, per_class=6, val_per_class=2, size=48)
    carry = tmp_path / "carry"
    index = carry_data.pack(src, carry, part_bytes=20_000, workers=1, images_per_shard=5, progress=False)

    def data_stage(name):
        suite = gpu_suite.Suite(tmp_path / name, "cuda", "quick", None, carry, "abc1234")  # the stage needs no GPU
        suite.sizes.photos, suite.sizes.photo_side = 4, 64
        suite.sizes.toy = {"classes": 2, "per_class": 4, "val_per_class": 2, "size": 32}
        result = gpu_suite.StageResult("data")
        suite.stage_data(result)
        return suite, result

    suite, result = data_stage("complete")
    assert result.status == "ok" and suite.data["shards_kind"] == "real" and "unpacked from" in result.detail
    (carry / carry_data.PART_DIR.format(index["parts"] - 1)).rename(tmp_path / "lost")
    suite, result = data_stage("partial")
    assert result.status == "ok" and suite.data["shards_kind"] == "toy" and "photos" in suite.data
    assert "DATA PARTS UNUSABLE" in result.detail and "parts missing" in result.detail
    assert all(gpu_suite.STAGE_INPUTS[s] in suite.data for s in ("dali", "train-main"))  # neither is skipped


def test_the_export_is_refreshed_after_every_stage(tmp_path):
    export = tmp_path / "export"
    suite = gpu_suite.Suite(tmp_path / "out", "cpu", "quick", None, tmp_path / "carry", "abc1234", export_dir=export)
    (suite.out / "work" / "big.safetensors").write_bytes(b"w" * 100)
    (suite.out / "work" / "huge.log").write_bytes(b"x" * (gpu_suite.ARCHIVE_FILE_LIMIT + 1))
    suite.stage("first", lambda r: suite.run_commands(r, [[sys.executable, "-c", "print('first stage ran')"]]))
    seen = {}

    def second(result):  # what a command cut here would bring back
        with tarfile.open(export / "gpu-suite.tar.gz") as tar:
            seen["names"] = tar.getnames()
            seen["log"] = tar.extractfile("gpu-suite/logs/first.log").read().decode()
        seen["summary"] = (export / "summary.md").read_text()
        result.status = "ok"

    suite.stage("second", second)
    assert "first stage ran" in seen["log"] and "| first | ok |" in seen["summary"]
    assert not any(n.endswith(("big.safetensors", "huge.log")) for n in seen["names"])


@pytest.mark.parametrize("device, runs", [("cuda", 2), ("cpu", 1)])
def test_proxy_stage_checks_twice_the_presets_learning_rate_on_a_gpu(device, runs, tmp_path, monkeypatch):
    from benchmarks import proxy
    from train import config

    suite = gpu_suite.Suite(tmp_path / "out", device, "full", None, tmp_path / "carry", "abc1234")
    suite.data = {"shards_kind": "real", "shards": tmp_path / "shards"}
    seen = []
    monkeypatch.setattr(suite, "run_commands", lambda result, commands: seen.extend(commands))
    suite.stage_proxy(gpu_suite.StageResult("proxy"))
    assert len(seen) == runs
    parsed = [proxy.parse_args(cmd[3:]) for cmd in seen]  # [python, -m, benchmarks.proxy, ...]
    assert parsed[0][0].epochs is None and parsed[0][1] == []  # the preset's own protocol
    assert len({args.out for args, _ in parsed}) == runs  # separate folders: no run reported for another
    if runs == 2:
        args, overrides = parsed[1]
        lr = float(overrides[0].split("=", 1)[1])
        assert args.epochs == [5] and lr == pytest.approx(2 * config.resolve(proxy.PRESET).optim.lr_per_256)


DEVICE_WHEELS = gpu_suite.REPO.parent / "shared" / "tools" / "device-wheels"


@pytest.mark.skipif(not DEVICE_WHEELS.is_file(), reason=f"{DEVICE_WHEELS} is absent (the project's shared tools)")
def test_the_documented_device_call_starts_with_the_install_line_device_wheels_prints():
    script = DEVICE_WHEELS.read_text()
    printed = script.split("cat <<EOT\n", 1)[1].split("\nEOT", 1)[0].strip()
    printed = printed.replace("\\$", "$").replace("-eq $n", "-eq 3")  # what the heredoc prints for 3 parts
    docs = (gpu_suite.REPO / "docs" / "BENCHMARKS.md").read_text()
    section = docs.split("## GPU suite: how to run it", 1)[1].split("\n## ", 1)[0]
    calls = [line.strip() for line in section.splitlines() if line.strip().startswith(printed)]
    assert len(calls) == 1, f"docs/BENCHMARKS.md has no device command starting with: {printed}"
    suite_args = calls[0][len(printed):].split("python3 -m benchmarks.gpu_suite ", 1)[1].split()
    assert {"--export", "$OUT", "--deadline-s"} <= set(suite_args)
    assert '[".carry/whl-p02", ".carry/data-p00"]' in section  # the data rides with the last wheel part


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_compiled_train_main_run_is_the_eager_one_compiled_at_one_resolution(device):
    sizes = gpu_suite.sizes_for(device, "quick")
    args = gpu_suite.compiled_train_args(sizes)
    res = sizes.compiled_train_res
    assert args[-3:] == [f"--schedule.res_min={res}", f"--schedule.res_max={res}", "--model.compile=true"]
    assert [a for a in args if a.startswith(("--schedule.res", "--model.compile"))] == args[-3:]
    kept = [a for a in sizes.train_args if not a.startswith(("--schedule.res", "--model.compile"))]
    assert args[:-3] == kept  # everything else as the eager run: the two runs differ only in compile
    assert "--model.compile=true" not in sizes.train_args  # the eager run trains as the preset does
    if device == "cuda":
        assert res in sizes.compiled_res  # the step stage compiles this resolution first (compile cache)


def test_compiled_over_eager_is_reported_only_at_the_same_resolution():
    def stage(name, epochs):
        return gpu_suite.StageResult(name, figures={"epochs": epochs})

    eager = [{"epoch": 1, "resolution": 160, "images_per_s": 4000.0}, {"epoch": 2, "resolution": 192, "images_per_s": 3000.0}]
    compiled = [{"epoch": 1, "resolution": 160, "images_per_s": 5000.0, "seconds": 80.0},
                {"epoch": 2, "resolution": 160, "images_per_s": 5200.0, "seconds": 9.0, "top1": 0.1}]
    figures = gpu_suite.collect_figures({"train-main": stage("train-main", eager),
                                         "train-main-compiled": stage("train-main-compiled", compiled)}, "NVIDIA H200")
    assert figures["ratios"] == {"train.main compiled / eager, epoch 1 at 160 px": 1.25}
    assert [e["images_per_s"] for e in figures["train_main_compiled"]["epochs"]] == [5000.0, 5200.0]
    assert "| train.main compiled epoch 1 (160 px) | 5000.0 img/s steady, epoch 80.0 s with the compile |" in \
        gpu_suite.figure_lines(figures)
    compiled[0]["resolution"] = 64  # another resolution: no ratio
    figures = gpu_suite.collect_figures({"train-main": stage("train-main", eager),
                                         "train-main-compiled": stage("train-main-compiled", compiled)}, "NVIDIA H200")
    assert figures["ratios"] == {}


def test_the_documented_quick_budgets_are_the_codes():
    text = (gpu_suite.REPO / "docs" / "BENCHMARKS.md").read_text()
    line = re.search(r"Budget: the quick profile plans (\d+) s of stages \(([^)]*)\)", " ".join(text.split()))
    assert line, "docs/BENCHMARKS.md lost its 'Budget: the quick profile plans ...' line"
    documented = {name: int(sec) for name, sec in re.findall(r"([a-z][a-z-]*) (\d+)", line.group(2))}
    budgets = {k: v for k, v in gpu_suite.sizes_for("cuda", "quick").budgets.items() if v}
    assert documented == budgets
    assert int(line.group(1)) == sum(budgets.values()) == gpu_suite.sizes_for("cuda", "quick").deadline_s


def test_the_last_planned_stage_gets_the_time_earlier_stages_saved(tmp_path):
    """A stage's own budget caps it, except the last planned one's: it gets all that is left before the deadline
    (the compiled trainer's compile time is the least known figure), so time saved earlier is not thrown away."""
    suite = gpu_suite.Suite(tmp_path / "out", "cpu", "quick", None, tmp_path / "carry", "abc1234", deadline_s=40)
    suite.sizes.budgets.update({"quick": 20, "slow-last": 6})
    suite.pending = ["quick", "slow-last"]
    suite.stage("quick", lambda r: suite.run_commands(r, [[sys.executable, "-c", "print('fine')"]]))
    suite.stage("slow-last", lambda r: suite.run_commands(r, [[sys.executable, "-c", "import time; time.sleep(8)"]]))
    by_name = {r.name: r for r in suite.results}
    assert by_name["quick"].budget_s == 20  # its own: the time left (~40 s) covers the planned 26 s
    assert by_name["slow-last"].status == "ok" and by_name["slow-last"].budget_s > 30  # not its own 6 s
