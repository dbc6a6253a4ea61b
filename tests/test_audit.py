"""The shortcut audit flags a dataset that leaks its labels through image size, and not one that does not."""
import numpy as np
import pytest

from chest_model.audit import file_metadata, mask_center, metadata_baseline, verdict
from chest_model.evaluation import evaluate_model, summary
from chest_model.preprocess import ImageLoadError
from helpers import make_class_folders, synthetic_xray, write_image


def _folder(root, leak: bool, per_class: int, seed: int):
    paths, labels = [], []
    rng = np.random.default_rng(seed)
    for label in range(3):
        for i in range(per_class):
            if leak:  # each class from its own "scanner": its own size and format
                h, w = (60 + 40 * label, 50 + 30 * label)
                ext = [".png", ".jpg", ".png"][label]
            else:
                h, w = int(rng.integers(60, 140)), int(rng.integers(50, 120))
                ext = [".png", ".jpg"][int(rng.integers(0, 2))]
            path = write_image(root / str(label) / f"{i}{ext}", synthetic_xray(h, w, seed=seed + 100 * label + i))
            paths.append(path)
            labels.append(label)
    return paths, labels


def test_metadata_baseline_catches_a_size_leak_and_not_a_fair_dataset(tmp_path):
    train = _folder(tmp_path / "leak_train", True, 12, 1)
    test = _folder(tmp_path / "leak_test", True, 6, 2)
    leaky = metadata_baseline(*train, *test)
    assert leaky["accuracy"] > 0.9
    train = _folder(tmp_path / "fair_train", False, 12, 3)
    test = _folder(tmp_path / "fair_test", False, 10, 4)
    fair = metadata_baseline(*train, *test)
    assert fair["accuracy"] < 0.6
    assert "metadata alone" in verdict(0.95, leaky["accuracy"], 0.3, 1 / 3)
    assert "no shortcut detected by these two checks" in verdict(0.95, fair["accuracy"], 0.3, 1 / 3)
    # Without a training folder the metadata check did not run, and the verdict does not claim it did.
    assert "the metadata check did not run" in verdict(0.95, None, 0.3, 1 / 3)
    assert "these two checks" not in verdict(0.95, None, 0.3, 1 / 3)
    assert verdict(0.95, None, 0.9, 1 / 3).startswith("with the lungs hidden the model still scores 90%")


def test_masks_hide_or_keep_the_centre():
    image = np.full((100, 100, 3), 10, np.uint8)
    image[40:60, 40:60] = 250
    hidden = mask_center(image, keep=False)
    kept = mask_center(image, keep=True)
    assert hidden[50, 50, 0] == 10 and kept[50, 50, 0] == 250
    assert kept[5, 5, 0] == hidden[5, 5, 0] == 10
    assert "lungs hidden" in verdict(0.9, 0.4, 0.88, 1 / 3)


def test_an_unreadable_training_file_is_left_out_and_listed(tmp_path):
    train = _folder(tmp_path / "train", True, 6, 1)
    test = _folder(tmp_path / "test", True, 3, 2)
    garbage = tmp_path / "train" / "1" / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    fake_dicom = tmp_path / "train" / "2" / "broken.dcm"
    fake_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # the DICOM magic, then a truncated header
    for path in (garbage, fake_dicom):
        with pytest.raises(ImageLoadError, match=path.name):
            file_metadata(path)
    baseline = metadata_baseline([*train[0], garbage, fake_dicom], [*train[1], 1, 2], *test)
    assert baseline["accuracy"] > 0.9 and baseline["n_train"] == len(train[0])
    assert len(baseline["unreadable_train_files"]) == 2
    assert str(garbage) in baseline["unreadable_train_files"][0] and str(fake_dicom) in baseline["unreadable_train_files"][1]
    nothing = metadata_baseline([garbage], [1], *test)
    assert nothing["accuracy"] is None and nothing["n_train"] == 0


def test_evaluation_reports_a_baseline_despite_a_garbage_training_file(tmp_path, tiny_model):
    make_class_folders(tmp_path / "data" / "train", per_class=4, size=48, seed=1)
    make_class_folders(tmp_path / "data" / "test", per_class=3, size=48, seed=2)
    garbage = tmp_path / "data" / "train" / "Covid" / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 truncated JPEG")
    metrics = evaluate_model(tiny_model, tmp_path / "data" / "test", n_bootstrap=20)
    audit = metrics["audit"]
    assert audit["metadata_baseline_accuracy"] is not None
    assert audit["metadata_n_train"] == 12
    # Named within the training folder, as every file in metrics.json (no local path in a shared file).
    assert audit["unreadable_train_files"] == ["Covid/garbage.jpg: cannot read image header (not a supported image format)"]
    assert "unreadable training files" in summary(metrics)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (its pixel data cut off): the audit reads headers only."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))  # PIL reads up to the next chunk
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + end)


def test_a_header_past_pils_bomb_limit_is_still_measured(tmp_path):
    """PIL refuses to open anything over ~179 MP; the decoder's own limit is higher, and the audit agrees with it."""
    _png_header_only(tmp_path / "wide.png", 15_000, 12_500)  # 187.5 MP
    height, width, aspect = file_metadata(tmp_path / "wide.png")[:3]
    assert (height, width) == (12_500, 15_000) and aspect == pytest.approx(1.2)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt: cannot read image header"):
        file_metadata(tmp_path / "notes.txt")


def test_the_metadata_of_a_dicom_file_without_its_preamble_is_read(tmp_path):
    import io

    import pydicom

    from chest_model.audit import file_metadata
    from corpus import dicom_bytes

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((40, 60), np.uint16))))
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(tmp_path / "IMG0001", ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert file_metadata(tmp_path / "IMG0001")[:3] == [40.0, 60.0, 1.5]
