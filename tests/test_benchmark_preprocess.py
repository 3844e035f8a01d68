import io

from PIL import Image

from benchmarks import preprocess as bench
from benchmarks.photos import photo_jpegs


def test_photo_jpegs_respect_max_side_and_are_decodable():
    sizes = [Image.open(io.BytesIO(b)).size for b in photo_jpegs(12, seed=1, max_side=300)]
    assert all(max(s) <= 300 for s in sizes)
    assert len(set(sizes)) > 1  # a mix of ImageNet-like shapes, not one fixed size


def test_benchmark_appends_one_row_per_worker_count(synthetic_parquet, tmp_path, capsys):
    report = tmp_path / "BENCH.md"
    assert bench.main(["--src", str(synthetic_parquet), "--workers", "1", "2", "--max-side", "48",
                       "--report", str(report)]) == 0
    text = report.read_text()
    assert "## Preprocessing" in text and "python -m benchmarks.preprocess --src" in text
    table = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and all("| 270 |" in line for line in table)  # 200 train + 70 val images
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("preprocess images/s per worker: ")
