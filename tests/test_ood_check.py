"""ood_check.py: the offline non-X-ray images and the share of them a model flags as uncertain."""
import numpy as np
import pytest

from chest_model import ood_check
from chest_model.ood_check import Sample, check, generated_images, missing_image_packages, non_xray_images, packaged_images
from chest_model.preprocess import load_image


def test_generated_images_are_fixed_by_their_seed():
    first, again, other = generated_images(64, seed=3), generated_images(64, seed=3), generated_images(64, seed=4)
    assert [s.name for s in first] == [s.name for s in again] and len(first) == 10
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not np.array_equal(first[3].image, other[3].image)  # the grey noise follows the seed
    assert {s.kind for s in first} == {"generated"}
    assert all(s.image.dtype == np.uint8 and s.image.shape[:2] == (64, 64) for s in first)


def test_every_bundled_image_is_found_and_decodes():
    """With the dev extras, every package's images are there, and the real decoder reads each one."""
    assert missing_image_packages() == []
    samples = packaged_images()
    sources = {s.name.split("/")[0] for s in samples}
    assert sources == {"scikit-image", "scikit-learn", "matplotlib", "pydicom"}
    assert len(samples) >= 30
    assert {s.kind for s in samples} == {"photograph or document", "other medical image"}
    for sample in samples:
        image = load_image(sample.image, name=sample.name)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, sample.name
    assert len(non_xray_images()) == len(samples) + 10


def test_a_package_that_is_not_installed_is_named_and_its_images_skipped(monkeypatch):
    real = ood_check._package_dir
    monkeypatch.setattr(ood_check, "_package_dir", lambda name: None if name == "skimage" else real(name))
    assert missing_image_packages() == ["scikit-image"]
    assert not any(s.name.startswith("scikit-image/") for s in packaged_images())


def test_check_counts_what_it_flags_overall_and_by_kind(tiny_model):
    samples = generated_images(64)[:4] + [Sample("x-ray-like", "photograph or document", np.full((64, 64), 90, np.uint8))]
    report = check(tiny_model, samples)
    assert report["n"] == 5 and len(report["images"]) == 5 and report["not_installed"] == []
    assert report["flagged"] == sum(row["uncertain"] for row in report["images"])
    assert report["rate"] == pytest.approx(report["flagged"] / 5)
    assert sum(kind["n"] for kind in report["by_kind"].values()) == 5
    assert report["by_kind"]["generated"]["n"] == 4
    for row in report["images"]:
        assert (row["label"] == "uncertain") == row["uncertain"] and (bool(row["reasons"]) == row["uncertain"])
    rows = {row["name"]: row for row in report["images"]}
    assert any(reason.startswith("blank or uniform image") for reason in rows["generated/blank grey"]["reasons"])
    assert any(reason.startswith("blank or uniform image") for reason in rows["x-ray-like"]["reasons"])
    assert check(tiny_model, [])["n"] == 0
