"""Class-folder discovery across several sources, the source-stratified split and balanced sampling."""
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from chest_model.data import (BalancedSampler, DatasetError, balanced_weights, build_train_augmentation, parse_data_dirs,
                              scan_image_folder, scan_sources, source_name, stratified_split)
from helpers import CLASS_NAMES, make_class_folders, synthetic_xray, write_image


@pytest.fixture
def two_roots(tmp_path):
    kids = make_class_folders(tmp_path / "kids" / "train", per_class=6, size=40, seed=1)
    adults = make_class_folders(tmp_path / "adults", per_class=8, size=40, seed=2)
    for name in ("Covid", "Viral Pneumonia"):
        shutil.rmtree(adults / name)
    return kids, adults


def test_source_names_come_from_folders_or_are_given(tmp_path):
    assert source_name(tmp_path / "covid19-dataset" / "train") == "covid19-dataset"
    assert source_name(tmp_path / "nih-adults") == "nih-adults"
    pairs = parse_data_dirs([str(tmp_path / "a" / "train"), f"rsna={tmp_path / 'b'}"])
    assert [name for name, _ in pairs] == ["a", "rsna"] and pairs[1][1] == tmp_path / "b"
    with pytest.raises(DatasetError, match="NAME=PATH"):
        parse_data_dirs([str(tmp_path / "x" / "train"), str(tmp_path / "x" / "test")])


def test_one_root_must_hold_every_class(two_roots):
    _, adults = two_roots
    _, problems = scan_image_folder(adults, CLASS_NAMES)
    assert any("missing class folder for 'Covid'" in p for p in problems)
    folder, problems = scan_image_folder(adults, CLASS_NAMES, partial=True)
    assert not problems and folder.counts() == {"Normal": 8, "Covid": 0, "Viral Pneumonia": 0}


def test_several_roots_merge_by_class_name_and_keep_their_source(two_roots):
    kids, adults = two_roots
    folder, problems = scan_sources(parse_data_dirs([str(kids), str(adults)]), CLASS_NAMES)
    assert not problems
    assert folder.source_names == ["kids", "adults"]
    assert folder.counts() == {"Normal": 14, "Covid": 6, "Viral Pneumonia": 6}
    assert folder.counts_by_source()["adults"] == {"Normal": 8, "Covid": 0, "Viral Pneumonia": 0}
    assert all(folder.sources[i] == 1 for i, p in enumerate(folder.paths) if "adults" in p.parts)


def test_several_roots_still_need_every_class_somewhere(two_roots, tmp_path):
    _, adults = two_roots
    other = make_class_folders(tmp_path / "other", per_class=2, size=40)
    shutil.rmtree(other / "Viral Pneumonia")
    _, problems = scan_sources(parse_data_dirs([str(adults), str(other)]), CLASS_NAMES)
    assert problems == [f"no images for class(es) ['Viral Pneumonia'] in any of {adults}, {other}"]
    (tmp_path / "empty").mkdir()
    _, problems = scan_sources(parse_data_dirs([str(adults), str(tmp_path / "empty")]), CLASS_NAMES)
    assert any("none of the class folders" in p for p in problems)


def test_single_source_split_is_the_class_stratified_one():
    labels = [0] * 20 + [1] * 10 + [2] * 10
    assert stratified_split(labels, 0.2, 7) == stratified_split(labels, 0.2, 7, sources=[0] * 40)


def test_split_is_stratified_by_class_and_source():
    # Normal comes from two sources of very different size; Covid and VP from the first only.
    labels = [0] * 20 + [1] * 20 + [2] * 20 + [0] * 60
    sources = [0] * 60 + [1] * 60
    train, val = stratified_split(labels, 0.25, 3, sources=sources)
    groups = Counter((labels[i], sources[i]) for i in val)
    assert groups == {(0, 0): 5, (1, 0): 5, (2, 0): 5, (0, 1): 15}
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)



@pytest.mark.parametrize("labels, sources, fraction", [
    # Normal: 6 images from one source and a single one from another (a stratum of one).
    ([0] * 6 + [1] * 6 + [2] * 6 + [0], [0] * 18 + [1], 0.25),
    # 15 class x source groups of two, but only 5 validation images.
    ([c for c in range(3) for _ in range(10)], [s for _ in range(3) for s in range(5) for _ in range(2)], 0.15),
])
def test_a_split_with_thin_groups_falls_back_to_coarser_strata_instead_of_failing(labels, sources, fraction):
    train, val = stratified_split(labels, fraction, 0, sources=sources)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert {labels[i] for i in val} == set(labels)  # every class is still validated

def test_balanced_weights_give_classes_equal_mass_split_between_sources():
    labels = [0] * 10 + [1] * 30 + [0] * 90
    sources = [0] * 40 + [1] * 90
    w = balanced_weights(labels, sources)
    mass = lambda mask: float(w[torch.tensor(mask)].sum())  # noqa: E731
    assert mass([l == 1 for l in labels]) == pytest.approx(mass([l == 0 for l in labels]))
    assert mass([l == 0 and s == 0 for l, s in zip(labels, sources)]) == pytest.approx(mass([s == 1 for s in sources]))


def test_balanced_sampler_is_reproducible_per_epoch_and_balanced():
    labels = [0] * 10 + [1] * 100
    sampler = BalancedSampler(labels, [0] * 110, seed=1, num_samples=2000)
    sampler.set_epoch(3)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 2000
    sampler.set_epoch(4)
    assert list(sampler) != first
    share = sum(labels[i] == 0 for i in first) / len(first)
    assert 0.45 < share < 0.55, share


@pytest.mark.parametrize("kind", ["standard", "framing", "acquisition", "devices"])
def test_augmentations_keep_uint8_images_and_their_size(kind):
    augment = build_train_augmentation(kind)
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    torch.manual_seed(0)
    outputs = [augment(image) for _ in range(10)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outputs)
    assert any(not torch.equal(o, image) for o in outputs)
    assert build_train_augmentation("none") is None


def test_framing_augmentation_zooms_in():
    """A bright frame around a dark square: crops of 50-100% of the area cut into the frame, often
    past it, so the dark centre fills more of the image than it did."""
    image = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    image[:, 16:48, 16:48] = 0
    dark_share = lambda x: float((x < 128).float().mean())  # noqa: E731
    torch.manual_seed(0)
    shares = [dark_share(build_train_augmentation("framing")(image)) for _ in range(50)]
    torch.manual_seed(0)
    standard = [dark_share(build_train_augmentation("standard")(image)) for _ in range(50)]
    assert sum(shares) / 50 > sum(standard) / 50 + 0.1, (sum(shares) / 50, sum(standard) / 50)


def test_framing_crops_get_the_models_contrast_normalisation_as_inference_gives_them(tiny_config):
    """A crop of a film normalised whole keeps the whole film's grey levels; inference would normalise
    the crop itself. With a preprocessor, every framing crop leaves with the crop's own normalisation."""
    from chest_model.preprocess import STANDARD_MEAN, STANDARD_STD, Preprocessor

    config = tiny_config.__class__.from_dict({**tiny_config.to_dict(), "image_size": 64, "contrast": "standardize"})
    preprocessor = Preprocessor(config)
    film = np.repeat(synthetic_xray(96, 80, seed=3)[..., None], 3, axis=2)
    cached = preprocessor.to_uint8_tensor(film)
    torch.manual_seed(0)
    crops = [build_train_augmentation("framing", preprocessor)(cached) for _ in range(10)]
    for crop in crops:
        grey = crop[0].float()
        assert abs(float(grey.mean()) - STANDARD_MEAN) < 3 and abs(float(grey.std()) - STANDARD_STD) < 3
    torch.manual_seed(0)
    unnormalised = [build_train_augmentation("framing")(cached) for _ in range(10)]
    assert max(abs(float(c[0].float().mean()) - STANDARD_MEAN) for c in unnormalised) > 3  # what the step corrects


def test_group_weights_give_every_source_class_group_equal_mass():
    labels = [0] * 10 + [1] * 30 + [0] * 90
    sources = [0] * 40 + [1] * 90
    sampler = BalancedSampler(labels, sources, by="group")
    mass = lambda mask: float(sampler.weights[torch.tensor(mask)].sum() / sampler.weights.sum())  # noqa: E731  (share of all draws)
    for group in [(0, 0), (1, 0), (0, 1)]:
        assert mass([(l, s) == group for l, s in zip(labels, sources)]) == pytest.approx(1 / 3)
    assert sampler.class_prior(2).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert BalancedSampler(labels, sources, by="class").class_prior(2).tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="by must be"):
        balanced_weights(labels, sources, by="sources")


def test_within_source_weights_balance_each_population_not_the_classes_overall():
    # The Kaggle layout: one source with Covid (adults), Normal and VP (children); two single-class
    # adult-normal supplements. Balancing classes overall would draw children Normal:VP 1:3.
    labels = [1] * 100 + [0] * 60 + [2] * 60 + [0] * 120 + [0] * 130
    sources = [0] * 220 + [1] * 120 + [2] * 130
    w = balanced_weights(labels, sources, by="source")
    mass = lambda mask: float(w[torch.tensor(mask)].sum() / w.sum())  # noqa: E731  (share of all draws)
    group = lambda c, s: [(l, x) == (c, s) for l, x in zip(labels, sources)]  # noqa: E731
    for c in range(3):
        assert mass(group(c, 0)) == pytest.approx(1 / 4)
    assert mass(group(0, 1)) == pytest.approx(1 / 8) and mass(group(0, 2)) == pytest.approx(1 / 8)
    children = lambda wts: float(wts[torch.tensor(group(0, 0))].sum() / wts[torch.tensor(group(2, 0))].sum())  # noqa: E731
    assert children(w) == pytest.approx(1.0)
    assert children(balanced_weights(labels, sources, by="class")) == pytest.approx(1 / 3)


def test_within_source_weights_reduce_to_class_balance_when_every_source_has_one_class():
    labels = [0] * 10 + [0] * 40 + [1] * 25
    sources = [0] * 10 + [1] * 40 + [2] * 25
    assert balanced_weights(labels, sources, by="source").tolist() == pytest.approx(balanced_weights(labels, sources).tolist())


def test_relative_names_keep_the_class_folder_of_symlinked_files_and_of_a_symlinked_root(tmp_path):
    from chest_model.data import relative_name

    real = tmp_path / "elsewhere" / "a.jpg"
    real.parent.mkdir()
    real.write_bytes(b"x")
    linked = tmp_path / "data" / "Covid" / "a.jpg"
    linked.parent.mkdir(parents=True)
    linked.symlink_to(real)
    assert relative_name(linked, tmp_path / "data") == "Covid/a.jpg"
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    assert relative_name(linked, tmp_path / "alias") == "Covid/a.jpg"
    assert relative_name(real, tmp_path / "data") == "a.jpg"  # outside the folder: the bare name


def test_folders_are_searched_without_hidden_folders_and_through_symlinked_ones(tmp_path):
    from chest_model.data import image_files_under, scan_image_folder

    root = make_class_folders(tmp_path / "data", per_class=1, size=40)
    normal = root / "Normal"
    (normal / ".thumbs").mkdir()
    write_image(normal / ".thumbs" / "thumb.png", synthetic_xray(40, 40))   # an app's cache: not training data
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    write_image(extra / "linked.PNG", synthetic_xray(40, 40, seed=3))
    (normal / "more").symlink_to(extra, target_is_directory=True)
    (extra / "loop").symlink_to(normal, target_is_directory=True)           # a link loop ends
    names = [p.relative_to(root).as_posix() for p in image_files_under(normal)]
    assert "Normal/more/linked.PNG" in names
    assert not any(".thumbs" in n for n in names) and len(names) == 2, names
    folder, problems = scan_image_folder(root, ["Normal", "Covid", "Viral Pneumonia"])
    assert not problems and len(folder.paths) == 4


@pytest.mark.parametrize("spec, message", [("=data", "empty NAME"), ("adults=", "no PATH"), ("..=data", "cannot name a data set"),
                                           ("nih/cxr8=data", "a NAME cannot contain '/'")])
def test_malformed_data_dir_arguments_are_refused_saying_why(spec, message):
    with pytest.raises(DatasetError, match=message):
        parse_data_dirs([spec])


def test_one_folder_given_twice_or_inside_another_is_refused(two_roots):
    kids, adults = two_roots
    with pytest.raises(DatasetError, match="share files"):
        parse_data_dirs([f"a={kids}", f"b={kids}/../train"])
    with pytest.raises(DatasetError, match="share files"):
        parse_data_dirs([f"all={kids.parent}", f"kids={kids}"])
    assert [name for name, _ in parse_data_dirs([f"kids={kids}", f"adults={adults}"])] == ["kids", "adults"]


def test_a_file_given_as_a_data_folder_is_named_as_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    _, problems = scan_image_folder(tmp_path / "data.zip", CLASS_NAMES)
    assert problems == [f"{tmp_path / 'data.zip'}: is a file, not a data folder (a data folder holds one folder per class)"]


def test_images_outside_the_class_folders_are_reported(two_roots, caplog):
    kids, _ = two_roots
    write_image(kids / "stray.png", synthetic_xray(40, 40))
    folder, problems = scan_image_folder(kids, CLASS_NAMES)
    assert not problems and all(p.name != "stray.png" for p in folder.paths)
    assert "1 image(s) lie directly in the data folder" in caplog.text


@pytest.mark.parametrize("seed", range(6))
def test_the_split_gives_every_class_to_both_parts_even_a_class_of_two(seed):
    labels = [0] * 30 + [1] * 30 + [2] * 2
    train, val = stratified_split(labels, 0.1, seed)
    assert {labels[i] for i in val} == {0, 1, 2} and {labels[i] for i in train} == {0, 1, 2}
    assert sorted(train + val) == list(range(len(labels)))


def test_a_data_set_named_after_a_folder_that_cannot_name_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / ".")
    with pytest.raises(DatasetError, match="cannot name a data set"):
        parse_data_dirs([".."])


def test_strata_split_each_group_equally_and_leave_the_groups_shares_alone():
    # One supplement source with 10 AP and 30 PA normals beside a two-class source: the AP films are
    # drawn as often as the PA ones, and the supplement as a whole as often as without strata.
    labels = [0] * 20 + [1] * 20 + [0] * 40
    sources = [0] * 40 + [1] * 40
    strata = ["-"] * 40 + ["AP"] * 10 + ["PA"] * 30
    plain = balanced_weights(labels, sources, by="source")
    w = balanced_weights(labels, sources, by="source", strata=strata)
    share = lambda wts, mask: float(wts[torch.tensor(mask)].sum() / wts.sum())  # noqa: E731
    supplement = [s == 1 for s in sources]
    assert share(w, supplement) == pytest.approx(share(plain, supplement))
    assert share(w, [x == "AP" for x in strata]) == pytest.approx(share(w, [x == "PA" for x in strata]))
    assert share(plain, [x == "AP" for x in strata]) == pytest.approx(share(plain, supplement) / 4)
    assert w[:40].tolist() == pytest.approx(plain[:40].tolist())  # one stratum: unchanged
    # The same stratum name in two groups is two cells: each group is split on its own.
    assert balanced_weights([0, 0, 1, 1], [0, 0, 0, 0], by="group", strata=["a", "b", "a", "a"]).tolist() == \
        pytest.approx([0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="strata has 3 entries for 4 samples"):
        balanced_weights([0, 0, 1, 1], [0, 0, 0, 0], strata=["a", "b", "a"])


def test_device_overlays_only_brighten_every_channel_alike_and_replay_with_the_seed():
    from chest_model.data import RandomDevices

    grey = torch.randint(0, 200, (1, 128, 128), dtype=torch.uint8).expand(3, -1, -1).contiguous()
    assert torch.equal(RandomDevices(p=0.0)(grey), grey)
    outputs = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = RandomDevices(p=1.0)(grey)
        assert out.dtype == torch.uint8 and out.shape == grey.shape
        assert (out >= grey).all() and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        changed = (out != grey).any(0).float().mean()
        assert 0.002 < changed < 0.25, f"seed {seed}: {changed:.3f} of the pixels changed"  # devices, not a wash-out
        assert int(out.max()) >= 200  # radio-opaque: brighter than the tissue they lie on
        outputs.append(out)
    torch.manual_seed(7)
    assert torch.equal(RandomDevices(p=1.0)(grey), outputs[7])
    assert len({o.sum().item() for o in outputs}) > 15  # every draw is different
    halves = [not torch.equal(RandomDevices(p=0.5)(grey), grey) for _ in range(200)]
    assert 0.35 < sum(halves) / len(halves) < 0.65


def test_a_folder_whose_name_holds_an_equals_sign_is_that_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_class_folders(tmp_path / "eq=dir" / "train", per_class=1, size=40)
    assert parse_data_dirs(["eq=dir/train"]) == [("eq=dir", Path("eq=dir/train"))]
    make_class_folders(tmp_path / "dir" / "train", per_class=1, size=40)  # now it also reads as NAME=PATH
    with pytest.raises(DatasetError, match=r"'eq=dir/train': is a folder, and also reads as NAME=PATH .*'data=eq=dir/train'"):
        parse_data_dirs(["eq=dir/train"])
    assert parse_data_dirs(["data=eq=dir/train"]) == [("data", Path("eq=dir/train"))]


def test_a_broken_link_among_the_images_is_listed_so_that_decoding_names_it(tmp_path):
    root = make_class_folders(tmp_path / "data", per_class=1, size=40)
    (root / "Normal" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    folder, problems = scan_image_folder(root, CLASS_NAMES)
    assert not problems and root / "Normal" / "gone.png" in folder.paths
    from chest_model import ImageLoadError, load_image

    with pytest.raises(ImageLoadError, match="gone.png: no such file .a symbolic link to a file that is not there."):
        load_image(root / "Normal" / "gone.png", name="gone.png")


def test_the_advice_for_mismatched_class_folders_fits_the_mistake(tmp_path):
    root = tmp_path / "dataset"
    make_class_folders(root / "train", per_class=1, size=40)
    make_class_folders(root / "test", per_class=1, size=40)
    _, problems = scan_image_folder(root, CLASS_NAMES)
    assert f"it holds split folders, each with class folders: pass one of them, e.g. {root / 'train'}" in problems[0]
    lower = tmp_path / "lower"
    for name in CLASS_NAMES:
        make_class_folders(lower, per_class=1, size=40, class_names=[name])
        (lower / name).rename(lower / name.lower())
    _, problems = scan_image_folder(lower, CLASS_NAMES)
    assert "only the letter case differs: rename 'covid' to 'Covid', 'normal' to 'Normal'" in problems[0]


def test_colour_is_measured_on_the_decoded_film_before_contrast_normalisation_greys_it(tmp_path):
    """The colour limit is fitted on these values: measured after ``standardize``/``equalize`` they would all be 0."""
    import cv2

    from chest_model import ChestXrayConfig
    from chest_model.data import decode_folder
    from chest_model.ood import chroma
    from chest_model.preprocess import Preprocessor, load_image

    gray = synthetic_xray(96, 96, seed=3)
    tinted = np.dstack([gray, np.clip(gray.astype(int) + 40, 0, 255).astype(np.uint8), gray])  # RGB, green cast
    path = tmp_path / "tinted.png"
    cv2.imwrite(str(path), cv2.cvtColor(tinted, cv2.COLOR_RGB2BGR))
    for contrast in ("standardize", "equalize"):
        preprocessor = Preprocessor(ChestXrayConfig(image_size=32, contrast=contrast))
        images, errors, chromas = decode_folder([path], preprocessor, num_threads=1)
        assert errors == [None]
        assert chromas[0] == pytest.approx(chroma(load_image(path))) and chromas[0] > 0.1
        assert int(images[0].max(dim=0).values.sub(images[0].min(dim=0).values).max()) == 0  # the cached film is grey


@pytest.mark.parametrize("labels, fraction", [
    ([0] * 5 + [1], 0.2),        # a class with one image cannot be in both parts
    ([0] * 3 + [1] * 3, 0.9),    # validation would leave training without a class
    ([0] * 10 + [1] * 10, 1.5),  # not a fraction
])
def test_a_split_that_cannot_be_made_is_refused_with_the_fix(labels, fraction):
    with pytest.raises(DatasetError, match="add images or pass --val-dir"):
        stratified_split(labels, fraction, 0)
