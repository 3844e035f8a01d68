"""benchmarks.viz_eval times viz's evaluation and Grad-CAM rows on tiny synthetic val shards and appends them."""

from __future__ import annotations

import re

from benchmarks import viz_eval


def test_viz_eval_benchmark_appends_both_stages(tmp_path, capsys):
    target = tmp_path / "BENCH.md"
    argv = ["--images", "12", "--max-side", "64", "--res", "32", "--batch-size", "8", "--threads", "1",
            "--arch", "resnet18", "--cams", "3", "--report", str(target)]
    assert viz_eval.main(argv) == 0
    match = re.search(r"viz evaluate images/s: ([0-9.]+)", capsys.readouterr().out)
    assert match and float(match.group(1)) > 0
    section = target.read_text().split("## viz evaluation", 1)[1]
    assert "| evaluate | cpu | resnet18 | 32 | 8 | 1 | False | 12 |" in section
    assert "| gradcam rows | cpu | resnet18 | 32 | 32 | 1 | False | 3 |" in section
