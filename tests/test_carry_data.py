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
