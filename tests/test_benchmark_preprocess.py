import io

import numpy as np
from PIL import Image

from benchmarks import preprocess as bench
from benchmarks import report
from benchmarks.photos import photo_jpegs, photo_like


def docs_files() -> dict:
    """Every file under the checkout's docs/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (report.REPO / "docs").rglob("*") if p.is_file()}


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


def test_a_plain_run_prints_the_rows_and_writes_no_file(synthetic_parquet, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(report.ENV_PATH, raising=False)
    monkeypatch.chdir(tmp_path)
    before = docs_files()
    assert bench.main(["--src", str(synthetic_parquet), "--workers", "1", "--encoders", "--max-side", "48"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("workers | images | seconds | images/s | images/s per worker")
    assert out[1].startswith("1 | 270 | ")  # 200 train + 70 val images, one worker
    assert out[-1].startswith("preprocess images/s per worker: ") and not any("appended to" in line for line in out)
    assert docs_files() == before and list(tmp_path.iterdir()) == []


def test_encoder_comparison_rows_and_bytes(synthetic_parquet, tmp_path, capsys):
    report = tmp_path / "BENCH.md"
    assert bench.main(["--src", str(synthetic_parquet), "--workers", "--rounds", "1", "--report", str(report)]) == 0
    text = report.read_text()
    assert "## Preprocessing encoder" in text and "## Preprocessing\n" not in text  # no shard runs asked for
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith(("| before |", "| auto |", "| keep |", "| always |"))}
    assert set(rows) == {"before", "auto", "keep", "always"}
    assert all(r[0] == "270" for r in rows.values())  # images
    assert rows["before"][4] == "1"  # x before (CPU)
    out = capsys.readouterr().out
    assert "encoder images per CPU-s (x before): before " in out


def test_flat_folder_subset_and_repeat(tmp_path):
    """A flat folder of images (as ../shared/data/imagenet-samples) becomes an ImageFolder of links."""
    src = tmp_path / "flat"
    src.mkdir()
    for i, jpeg in enumerate(photo_jpegs(6, seed=2, max_side=120)):
        (src / f"n0000{i % 2}_photo's_{i}.JPEG").write_bytes(jpeg)
    tree = bench.link_tree(src, tmp_path / "tree", limit=4, repeat=2)
    links = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.JPEG"))
    assert len(links) == 8 and {p.split("/")[1] for p in links} == {"n00000", "n00001"}
    assert all(p.startswith("train/") for p in links)
    assert len(bench.source_images(str(tree))) == 8
    rows = bench.compare_encoders(bench.source_images(str(tree)), ["auto"], max_side=500, quality=90, rounds=1)
    assert rows[0]["kept unchanged"] == 8 and rows[0]["output/source bytes"] == 1.0  # q90 sources need no change


def test_issue20_candidates_against_the_encoder_before_issue_20():
    """`issue9` re-implements `auto` as it was before issue 20 (Pillow's draft() only for >= 4x): on images
    that need no resize it gives reencode's bytes; every candidate gets rate, byte and PSNR columns against it."""
    sources = list(photo_jpegs(4, seed=3, quality=95))  # q95: re-encoded, as most ImageNet files
    for size in ((1200, 900), (640, 1000)):  # and two to shrink, 2.4x and 2x
        out = io.BytesIO()
        photo_like(np.random.default_rng(4), *size).save(out, format="JPEG", quality=95)
        sources.append(out.getvalue())
    for data in sources:
        if max(Image.open(io.BytesIO(data)).size) <= 500:
            assert bench.candidate(data, max_side=500, quality=90).jpeg == bench.encode.reencode(data).jpeg
    rows = bench.compare_encoders(sources, ["issue9", "auto", "cv2-area"], max_side=500, quality=90, rounds=1)
    base, auto, area = rows
    assert base["x issue9 (CPU)"] == 1 and base["bytes / issue9"] == 1 and base["mean dB vs issue9"] == 0
    assert auto["resized"] == base["resized"] > 0
    assert area["mean dB vs issue9"] < 0  # INTER_AREA is not the Lanczos ideal
