"""batch_predict.py: finding the files, one record per file in input order, the CSV table, Grad-CAM paths."""
import csv
import io
from pathlib import Path

import cv2
import pytest
import torch

from chest_model.batch_predict import (
    ColumnClashError,
    csv_columns,
    find_images,
    gradcam_path,
    predict_files,
    predict_inputs,
    records_to_csv,
    write_csv,
)
from chest_model.errors import ChestModelError
from helpers import CLASS_NAMES, synthetic_xray, write_image


@pytest.fixture
def scans(tmp_path):
    """Two images with the same name in different folders, a broken file and an empty folder."""
    root = tmp_path / "scans"
    first = write_image(root / "a" / "x.png", synthetic_xray(80, 72, seed=1))
    second = write_image(root / "b" / "x.JPG", synthetic_xray(72, 80, seed=2, kind=1))
    broken = root / "b" / "broken.png"
    broken.write_bytes(first.read_bytes()[:50])
    (root / "empty").mkdir()
    return {"root": root, "first": first, "second": second, "broken": broken}


def test_find_images_searches_folders_once_and_reports_empty_ones(scans):
    root = scans["root"]
    files, problems = find_images([scans["first"], root / "a", root / "b", root / "empty"])
    assert files == [scans["first"], scans["broken"], scans["second"]]  # the named file once, then each folder sorted
    assert problems == [(root / "empty", f"{root / 'empty'}: folder holds no image files (searched recursively)")]


def test_a_file_named_directly_is_kept_whatever_its_extension(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert find_images([notes]) == ([notes], [])


def test_every_file_gets_a_record_in_order_and_a_bad_one_does_not_stop_the_others(tiny_model, scans):
    files = [scans["first"], scans["broken"], scans["second"]]
    finished = []
    records = list(predict_files(tiny_model, files, batch_size=2, progress=finished.append))
    assert [r["file"] for r in records] == [str(f) for f in files]
    assert finished == [2, 1]
    good, bad, other = records
    assert bad["error"].startswith(str(scans["broken"])) and bad["label"] is None and bad["probabilities"] == {}
    for record in (good, other):
        assert record["error"] is None and list(record["probabilities"]) == CLASS_NAMES
        assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert record["label"] in [*CLASS_NAMES, "uncertain"] and isinstance(record["uncertain"], bool)
    one_at_a_time = list(predict_files(tiny_model, files, batch_size=1))
    for batched, single in zip(records, one_at_a_time):
        for name, value in batched["probabilities"].items():
            assert single["probabilities"][name] == pytest.approx(value, abs=1e-5)


def test_gradcam_overlays_mirror_the_input_folders(tiny_model, scans, tmp_path):
    out = tmp_path / "cams"
    list(predict_files(tiny_model, [scans["first"], scans["second"]], gradcam_dir=out))
    first, second = out / "a" / "x.png.png", out / "b" / "x.JPG.png"
    assert gradcam_path(out, scans["root"], scans["first"]) == first
    for path, source in ((first, scans["first"]), (second, scans["second"])):
        overlay = cv2.imread(str(path), cv2.IMREAD_COLOR)
        # the image as the model decoded it: a large JPEG is decoded at reduced scale, no smaller than the input size
        assert overlay is not None and overlay.shape[:2] == tiny_model.preprocessor.load(source).shape[:2]
    assert cv2.imread(str(first)).shape[:2] == (80, 72)


def test_a_model_that_outputs_nan_writes_no_overlay_and_still_reports_every_file(tiny_model, scans, tmp_path):
    with torch.no_grad():
        tiny_model.head[-1].bias[0] = float("nan")
    out = tmp_path / "cams"
    records = list(predict_files(tiny_model, [scans["first"], scans["second"]], gradcam_dir=out))
    assert [r["error"] for r in records] == [None, None] and all(r["uncertain"] for r in records)
    assert not out.exists() or not any(out.rglob("*.png"))


def test_predict_inputs_lists_the_inputs_problems_first(tiny_model, scans):
    records = list(predict_inputs(tiny_model, [scans["first"], scans["root"] / "empty"]))
    assert [r["file"] for r in records] == [str(scans["root"] / "empty"), str(scans["first"])]
    assert "folder holds no image files" in records[0]["error"] and records[1]["error"] is None


def test_the_csv_has_one_row_per_record_and_one_column_per_class(tmp_path):
    records = [
        {"file": "a.png", "label": "Covid", "uncertain": False, "probabilities": dict(zip(CLASS_NAMES, (0.1, 0.7, 0.2))),
         "error": None},
        {"file": "b.png", "label": None, "uncertain": None, "probabilities": {}, "error": "b.png: truncated PNG"},
    ]
    text = records_to_csv(records, CLASS_NAMES)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["file", "label", "uncertain", *CLASS_NAMES, "error"]
    assert rows[0] == {"file": "a.png", "label": "Covid", "uncertain": "False", "Normal": "0.100000", "Covid": "0.700000",
                       "Viral Pneumonia": "0.200000", "error": ""}
    assert rows[1] == {"file": "b.png", "label": "", "uncertain": "", "Normal": "", "Covid": "", "Viral Pneumonia": "",
                       "error": "b.png: truncated PNG"}
    write_csv(tmp_path / "new" / "out.csv", records, CLASS_NAMES)
    assert (tmp_path / "new" / "out.csv").read_text() == text


def test_a_class_named_like_a_column_is_refused():
    assert csv_columns(CLASS_NAMES) == ["file", "label", "uncertain", *CLASS_NAMES, "error"]
    with pytest.raises(ColumnClashError, match=r"\['error', 'label'\]") as info:
        csv_columns(["label", "Covid", "error"])
    assert isinstance(info.value, ChestModelError) and isinstance(info.value, ValueError)


def test_a_file_named_in_several_spellings_is_predicted_once_under_its_first_name(scans, monkeypatch):
    monkeypatch.chdir(scans["root"] / "a")
    files, _ = find_images(["x.png", scans["first"], "../a/x.png", "../a"])
    assert files == [Path("x.png")]


def test_gradcam_overlays_stay_inside_their_folder_when_inputs_climb_with_dotdot(tiny_model, scans, monkeypatch):
    monkeypatch.chdir(scans["root"] / "a")
    out = scans["root"].parent / "cams"
    list(predict_files(tiny_model, [Path("x.png"), Path("../b/x.JPG")], gradcam_dir=Path("../../cams")))
    written = sorted(p.relative_to(scans["root"].parent) for p in scans["root"].parent.rglob("*.png.png")) + sorted(
        p.relative_to(scans["root"].parent) for p in scans["root"].parent.rglob("*.JPG.png"))
    assert written == [Path("cams/a/x.png.png"), Path("cams/b/x.JPG.png")]
    assert out.is_dir()


def test_two_links_to_one_file_are_two_files(scans, tmp_path):
    # A Hub snapshot links identical files to one blob: each name is still its own input.
    (tmp_path / "first.png").symlink_to(scans["first"])
    (tmp_path / "second.png").symlink_to(scans["first"])
    files, _ = find_images([tmp_path / "first.png", tmp_path / "second.png"])
    assert files == [tmp_path / "first.png", tmp_path / "second.png"]
