"""benchmarks.carry_data: real-photo shards survive the split into upload parts (and a damaged or missing part is
named), and the quick profile packs a class-balanced Imagenette subset into one part small enough to ride
beside the last wheel part (checked on ../shared/data/imagenette-144 where it exists)."""

from __future__ import annotations

import pytest

from benchmarks import carry_data
from benchmarks.toydata import write_image_folders


def test_real_photo_shards_survive_the_split_into_upload_parts(tmp_path):
    src = write_image_folders(tmp_path / "photos", classes=3, per_class=6, val_per_class=2, size=48)
    carry = tmp_path / "carry"
    index = carry_data.pack(src, carry, part_bytes=20_000, workers=1, images_per_shard=5, progress=False)
    assert index["parts"] >= 3 and len(carry_data.existing_parts(carry)) == index["parts"]
    assert all(p.stat().st_size <= 20_000 for p in carry.glob("data-p*/data-part-*"))
    out = carry_data.unpack(carry, tmp_path / "unpacked") and tmp_path / "unpacked"
    packed = carry / "photos-shards"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(packed) for p in packed.rglob("*"))
    assert (out / "manifest.json").read_bytes() == (packed / "manifest.json").read_bytes()

    last = carry / carry_data.PART_DIR.format(index["parts"] - 1) / carry_data.PART_FILE.format(index["parts"] - 1)
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(carry_data.CarryError, match="do not add up"):
        carry_data.unpack(carry, tmp_path / "again")
    last.unlink()
    with pytest.raises(carry_data.CarryError, match=f"parts missing.*data-p{index['parts'] - 1:02d}"):
        carry_data.unpack(carry, tmp_path / "again")


def _per_class(shards, split):
    import json

    return json.loads((shards / "manifest.json").read_text())["splits"][split]["per_class"]


def test_quick_profile_packs_a_class_balanced_subset_into_one_part_that_shrinks_to_fit(tmp_path):
    src = write_image_folders(tmp_path / "photos", classes=3, per_class=40, val_per_class=12, size=128)  # ~5 KB each
    carry = tmp_path / "carry"
    (carry / "data-p05").mkdir(parents=True)  # a part of an earlier pack: removed
    limit = 250_000  # bytes: a subset of the photos; the first estimate overshoots (fixed overheads), then shrinks
    index = carry_data.pack_quick(src, carry, max_bytes=limit, workers=1, progress=False)
    assert index["parts"] == 1 and index["bytes"] <= limit and [p.name for p in carry_data.existing_parts(carry)] == ["data-p00"]
    train, val = index["per_class"]["train"], index["per_class"]["val"]
    assert 4 <= train < 40 and val == max(1, int(train * carry_data.QUICK_VAL_FRACTION))
    out = tmp_path / "unpacked"
    carry_data.unpack(carry, out)
    assert _per_class(out, "train") == [train] * 3 and _per_class(out, "val") == [val] * 3
    with pytest.raises(carry_data.CarryError, match="could not fit"):
        carry_data.pack_quick(src, tmp_path / "tiny", max_bytes=2_000, workers=1, progress=False)


def test_the_quick_part_says_whether_it_fits_beside_the_last_wheel_part(tmp_path):
    index = {"bytes": 12 << 20}
    assert "no wheel parts" in carry_data.beside_last_wheel_part(tmp_path, index)
    for part, size in (("whl-p00", 60 << 20), ("whl-p01", 30 << 20)):
        (tmp_path / part).mkdir()
        (tmp_path / part / "whl-part").write_bytes(b"\0" * size)
    assert carry_data.beside_last_wheel_part(tmp_path, index).startswith("whl-p01 (30.0 MiB)")
    assert ": fits" in carry_data.beside_last_wheel_part(tmp_path, index)
    (tmp_path / "whl-p01" / "whl-part").write_bytes(b"\0" * (50 << 20))
    assert "does NOT fit" in carry_data.beside_last_wheel_part(tmp_path, index)


@pytest.mark.skipif(not carry_data.DEFAULT_SRC.is_dir(), reason=f"{carry_data.DEFAULT_SRC} is absent (the shared "
                    "Imagenette-144 copy: CI and the project's machines have it, a user's checkout may not)")
def test_quick_profile_of_imagenette_144_is_one_balanced_part_of_at_most_12_mib(tmp_path):
    carry = tmp_path / "carry"
    assert carry_data.main(["pack", "--profile", "quick", "--carry", str(carry), "--workers", "2"]) == 0
    part = carry / "data-p00" / "data-part-00"
    assert part.stat().st_size <= 12 * carry_data.MIB and not (carry / "data-p01").exists()
    out = tmp_path / "shards"
    assert carry_data.main(["unpack", "--carry", str(carry), "--out", str(out)]) == 0
    train, val = _per_class(out, "train"), _per_class(out, "val")
    assert len(train) == 10 and len(set(train)) == 1 and train[0] >= 90  # ~1,000 train photos: 4 steps of 256
    assert len(set(val)) == 1 and val[0] >= 20
