"""The data folder reader: both caption conventions, bad items reported by file name and
refused or skipped (never silently dropped); batches and masks."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.training.data import DataError, movq_pixels, random_keep_masks, scan_folder
from kandinsky.training.loop import interleave, step_indices


def _png(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def jsonl_folder(tmp_path):
    d = tmp_path / "jsonl"
    for name in ("a.png", "b.png", "sub/c.png", "small.png", "broken.png", "unlisted.png"):
        _png(d / name, (16, 16) if name == "small.png" else (64, 64))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"file_name": "a.png", "text": "an a"}, {"file_name": "b.png", "text": ""},
            {"file_name": "sub/c.png", "text": "a c"}, {"file_name": "small.png", "text": "small"},
            {"file_name": "broken.png", "text": "broken"}, {"file_name": "gone.png", "text": "gone"}]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no file"})]
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_metadata_jsonl_bad_items_are_refused_by_name(jsonl_folder):
    with pytest.raises(DataError) as e:
        scan_folder(jsonl_folder, min_size=32)
    message = str(e.value)
    for expected in ("b.png: empty caption", "small.png: too small (16x16", "broken.png: unreadable image",
                     "unlisted.png: no caption (not listed in metadata.jsonl)", "gone.png: listed in metadata.jsonl",
                     "metadata.jsonl line 7: not JSON", "metadata.jsonl line 8: no \"file_name\"",
                     "--on-bad-data skip"):
        assert expected in message, expected
    assert message.startswith("7 bad item(s)")


def test_skip_reports_every_skipped_item(jsonl_folder):
    logged = []
    items = scan_folder(jsonl_folder, min_size=32, on_bad="skip", log=logged.append)
    assert [(i.path.name, i.text) for i in items] == [("a.png", "an a"), ("c.png", "a c")]
    assert len([m for m in logged if m.startswith("skipped ")]) == 7
    assert "training on 2 item(s)" in logged[-1]
    # the decoder needs no caption: b.png (empty) and unlisted.png come back, with text ""
    items = scan_folder(jsonl_folder, need_text=False, min_size=32, on_bad="skip", log=logged.append)
    assert sorted(i.path.name for i in items) == ["a.png", "b.png", "c.png", "unlisted.png"]


def test_txt_captions_beside_images(tmp_path):
    d = tmp_path / "txt"
    _png(d / "x.jpg")
    (d / "x.txt").write_text("  an x \n")
    _png(d / "y.png")
    with pytest.raises(DataError, match=r"y.png: no caption \(y.txt not found\)"):
        scan_folder(d)
    assert [(i.path.name, i.text) for i in scan_folder(d, on_bad="skip", log=lambda m: None)] == [("x.jpg", "an x")]
    with pytest.raises(DataError, match="no usable images"):
        scan_folder(tmp_path / "txt" / "..", on_bad="skip", min_size=1000, log=lambda m: None)


def test_movq_pixels_resize_and_crop():
    image = PIL.Image.fromarray(np.concatenate([np.zeros((64, 64, 3)), np.full((64, 64, 3), 255)], 1).astype(np.uint8))
    x = movq_pixels(image, 32)  # 64x128 -> 32x64 -> centre 32x32: half black, half white
    assert x.shape == (3, 32, 32)
    assert x[:, :, :14].max() == -1 and x[:, :, 18:].min() == 1


def test_step_indices_cover_each_epoch_once():
    seen = torch.cat([step_indices(s, 10, 4, seed=3) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(step_indices(2, 10, 4, seed=3), step_indices(2, 10, 4, seed=3))
    assert not torch.equal(seen[:10], torch.cat([step_indices(s, 10, 4, seed=4) for s in range(5)])[:10])


def test_interleave_inverts_rank_shards():
    x = torch.arange(7)
    assert torch.equal(interleave([x[r::3] for r in range(3)], 7), x)


def test_random_keep_masks():
    keep = random_keep_masks(16, 8, 8, torch.Generator().manual_seed(0))
    assert keep.shape == (16, 1, 8, 8) and set(keep.unique().tolist()) <= {0.0, 1.0}
    repainted = (keep == 0).flatten(1).sum(1)
    assert (repainted >= 1).all() and repainted.float().std() > 0


def test_exif_orientation_and_hidden_files(tmp_path):
    from kandinsky.training.data import load_rgb

    d = tmp_path / "pics"
    image = PIL.Image.new("RGB", (40, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to view
    d.mkdir()
    image.save(d / "photo.jpg", exif=exif)
    (d / "photo.txt").write_text("a photo")
    _png(d / ".ipynb_checkpoints" / "photo-checkpoint.png")
    items = scan_folder(d)
    assert [i.path.name for i in items] == ["photo.jpg"]  # the hidden folder is not data
    assert load_rgb(items[0].path).size == (20, 40)  # upright, as viewers show it
