"""The copies audit finds a film saved again (re-encoded, resized, another contrast) and tells distinct films apart."""
import hashlib

import cv2
import numpy as np
import pytest

from chest_model.config import ChestXrayConfig
from chest_model.duplicates import HASH_SIZE, MAX_DISTANCE, image_hash, nearest, train_test_copies
from chest_model.evaluation import copies_lines, evaluate_model, hash_training_files, summary
from chest_model.preprocess import Preprocessor
from helpers import CLASS_NAMES, DATASET, EXAMPLES, make_class_folders, requires_dataset, write_image

LOAD = Preprocessor(ChestXrayConfig(image_size=128)).load  # the decode every command uses


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(nearest(a[None], b[None])[1][0])


def test_a_film_saved_again_is_a_copy_and_other_films_are_not(tmp_path):
    original = cv2.imread(str(EXAMPLES / "covid.jpeg"), cv2.IMREAD_GRAYSCALE)
    h, w = original.shape
    variants = {
        "re-encoded at JPEG quality 40": write_image(tmp_path / "q40.jpg", original, params=[cv2.IMWRITE_JPEG_QUALITY, 40]),
        "half the size, as PNG": write_image(tmp_path / "half.png", cv2.resize(original, (w // 2, h // 2), interpolation=cv2.INTER_AREA)),
        "another contrast (gamma 0.6)": write_image(tmp_path / "gamma.png", (255 * (original / 255.0) ** 0.6).astype(np.uint8)),
    }
    reference = image_hash(LOAD(EXAMPLES / "covid.jpeg"))
    assert reference.shape == (HASH_SIZE ** 2,) and reference.dtype == bool
    for what, path in variants.items():
        assert _distance(image_hash(LOAD(path)), reference) <= MAX_DISTANCE, what
    others = [image_hash(LOAD(EXAMPLES / name)) for name in ("normal.jpeg", "viral-pneumonia.jpeg")]
    for other in others:
        assert _distance(other, reference) > MAX_DISTANCE
    assert _distance(others[0], others[1]) > MAX_DISTANCE


def test_nearest_is_the_hamming_distance_to_the_closest_reference():
    rng = np.random.default_rng(0)
    queries, references = rng.random((7, 256)) < 0.5, rng.random((11, 256)) < 0.5
    index, distance = nearest(queries, references)
    brute = (queries[:, None, :] != references[None, :, :]).sum(-1)
    assert (distance == brute.min(1)).all() and (brute[np.arange(7), index] == distance).all()
    assert distance.dtype.kind == "i"
    in_blocks = nearest(queries, references, chunk=3)  # a block of queries at a time: the same answers
    assert (in_blocks[0] == index).all() and (in_blocks[1] == distance).all()
    index, distance = nearest(queries, references[:0])
    assert len(index) == 7 and (distance > MAX_DISTANCE).all()  # nothing to copy from: no copies


def test_the_report_counts_copies_per_class_and_names_the_files():
    rng = np.random.default_rng(1)
    train = rng.random((4, 256)) < 0.5
    flipped = train[2].copy()
    flipped[:10] ^= True  # a copy, 10 bits off
    evaluated = np.stack([flipped, rng.random(256) < 0.5, train[0]])
    report, copied = train_test_copies(evaluated, [1, 1, 2], ["Covid/a.png", "Covid/b.png", "Viral Pneumonia/c.png"],
                                       train, [f"src/{i}.png" for i in range(4)], CLASS_NAMES)
    assert copied.tolist() == [True, False, True]
    assert report["n"] == 2 and report["of"] == 3 and report["n_train"] == 4
    assert report["by_class"] == {"Covid": {"copies": 1, "n": 2}, "Viral Pneumonia": {"copies": 1, "n": 1}}
    assert report["pairs"] == [{"file": "Covid/a.png", "train_file": "src/2.png", "distance": 10},
                               {"file": "Viral Pneumonia/c.png", "train_file": "src/0.png", "distance": 0}]


def test_evaluation_reports_test_images_copied_from_training_and_the_figures_without_them(tmp_path, tiny_model):
    train = make_class_folders(tmp_path / "data" / "train", per_class=2, size=64, seed=1)
    test = tmp_path / "data" / "test"
    for name in CLASS_NAMES:
        (test / name).mkdir(parents=True)
    # Real, distinct films only: three example X-rays, one of them also (re-encoded) in training.
    for name, example in zip(CLASS_NAMES, ("normal.jpeg", "covid.jpeg", "viral-pneumonia.jpeg")):
        (test / name / example).write_bytes((EXAMPLES / example).read_bytes())
    original = cv2.imread(str(EXAMPLES / "covid.jpeg"), cv2.IMREAD_GRAYSCALE)
    write_image(train / "Covid" / "same-film.jpg", original, params=[cv2.IMWRITE_JPEG_QUALITY, 50])
    metrics = evaluate_model(tiny_model, test, n_bootstrap=20)
    copies = metrics["audit"]["train_copies"]
    assert copies["n"] == 1 and copies["of"] == 3 and copies["n_train"] == 7 and copies["searched"] == "the training folders"
    assert copies["pairs"][0]["file"] == "Covid/covid.jpeg"
    assert copies["pairs"][0]["train_file"] == "data/Covid/same-film.jpg"  # the source's name, not a local path
    predicted = {row["file"]: row["predicted"] for row in metrics["hardest"]}
    fresh = {"Normal": "Normal/normal.jpeg", "Viral Pneumonia": "Viral Pneumonia/viral-pneumonia.jpeg"}
    assert copies["accuracy_without"] == np.mean([predicted[f] == name for name, f in fresh.items()])
    assert copies["recall_without"] == {name: float(predicted[f] == name) for name, f in fresh.items()}
    assert "copies of training images: 1 of 3 (Normal 0 of 1, Covid 1 of 1, Viral Pneumonia 0 of 1)" in summary(metrics)
    # Given files (train.py gives its training split): only those are searched, and named as given.
    given = hash_training_files(tiny_model, [("kids/x.jpg", train / "Covid" / "same-film.jpg")], "the training split")
    only = evaluate_model(tiny_model, test, training_images=given, n_bootstrap=20)["audit"]["train_copies"]
    assert only["n_train"] == 1 and only["pairs"][0]["train_file"] == "kids/x.jpg" and only["searched"] == "the training split"
    assert "train_copies" not in evaluate_model(tiny_model, test, training_images=hash_training_files(tiny_model, []),
                                                n_bootstrap=20)["audit"]


def test_without_readable_training_images_the_audit_says_not_checked_and_a_wrong_train_dir_is_an_error(tmp_path, tiny_model, capsys):
    from chest_model.cli import main as cli_main

    test = make_class_folders(tmp_path / "data" / "test", per_class=2, size=48, seed=2)
    (tmp_path / "data" / "train" / "Covid").mkdir(parents=True)
    (tmp_path / "data" / "train" / "Covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    metrics = evaluate_model(tiny_model, test, n_bootstrap=20)
    assert "train_copies" not in metrics["audit"]
    assert "copies of training images: not checked (no readable training image to compare with; --train-dir names the training folders)" in summary(metrics)
    tiny_model.save_pretrained(tmp_path / "model")
    missing = tmp_path / "no-such-folder"
    status = cli_main(["evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(test), "--train-dir", str(missing)])
    assert status == 2
    assert f"cannot use --train-dir:\n  - {missing}: data folder does not exist" in capsys.readouterr().err


def test_image_hash_takes_grey_rgb_and_rgba_alike_and_refuses_what_it_would_misread():
    rgb = LOAD(EXAMPLES / "normal.jpeg")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    reference = image_hash(rgb)
    for same in (grey, grey[:, :, None], cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)):
        assert _distance(image_hash(same), reference) <= 2
    with pytest.raises(TypeError, match="uint8"):
        image_hash(grey.astype(np.uint16) * 257)
    with pytest.raises(ValueError, match="shape"):
        image_hash(np.zeros((4, 8, 8, 3), np.uint8))
    assert copies_lines(None) == ["copies of training images: not checked (no readable training image to compare with; --train-dir names the training folders)"]


def test_training_cached_images_hash_as_their_files_do():
    """train.py hashes its cached images (resized, contrast-standardised): a film's cached hash stays
    within a few bits of its file's, and distinct films stay far apart."""
    from chest_model.duplicates import cached_image_hashes

    config = ChestXrayConfig(image_size=128, contrast="standardize")
    preprocessor = Preprocessor(config)
    names = ("covid.jpeg", "normal.jpeg", "viral-pneumonia.jpeg")
    files = np.array([image_hash(preprocessor.load(EXAMPLES / n)) for n in names])
    cached = cached_image_hashes([preprocessor.to_uint8_tensor(preprocessor.load(EXAMPLES / n)) for n in names])
    index, distance = nearest(cached, files)
    assert index.tolist() == [0, 1, 2] and distance.max() <= 12, distance
    assert nearest(cached[:1], cached[1:])[1][0] > MAX_DISTANCE


@requires_dataset()
def test_the_real_test_split_holds_copies_of_training_films_and_nothing_close_to_one():
    """On the COVID-19 Image Dataset: every test file byte-identical to a training file is found, and
    the nearest training film of every test image is either a copy (at most 22 bits off) or far (58+),
    the margin ``MAX_DISTANCE`` sits in (see duplicates.py)."""
    def files(split):
        return sorted(p for p in (DATASET / split).rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    train, test = files("train"), files("test")
    train_hashes = np.array([image_hash(LOAD(p)) for p in train])
    test_hashes = np.array([image_hash(LOAD(p)) for p in test])
    index, distance = nearest(test_hashes, train_hashes)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in train}
    identical = {i for i, p in enumerate(test) if hashlib.sha256(p.read_bytes()).hexdigest() in digests}
    assert identical and all(distance[i] == 0 for i in identical)
    copies = distance <= MAX_DISTANCE
    assert distance[copies].max() <= 22 and distance[~copies].min() >= 58, sorted(distance.tolist())
    assert copies.sum() > len(identical)  # re-processed copies too, not only identical files
    assert {p.parent.name for p, c in zip(test, copies) if c} == {"Covid"}


@pytest.mark.parametrize("bits", [0, MAX_DISTANCE, MAX_DISTANCE + 1])
def test_the_threshold_is_inclusive(bits):
    a = np.zeros(256, bool)
    b = a.copy()
    b[:bits] = True
    report, copied = train_test_copies(a[None], [0], ["Normal/x.png"], b[None], ["s/y.png"], CLASS_NAMES)
    assert copied.tolist() == [bits <= MAX_DISTANCE]


def test_an_external_set_says_how_many_of_its_images_the_model_was_trained_on(tmp_path, tiny_model):
    from chest_model.evaluation import evaluate_external, external_summary

    external = tmp_path / "adults"
    (external / "Normal").mkdir(parents=True)
    for example in ("normal.jpeg", "covid.jpeg"):  # two distinct real films, filed as Normal
        (external / "Normal" / example).write_bytes((EXAMPLES / example).read_bytes())
    original = cv2.imread(str(EXAMPLES / "covid.jpeg"), cv2.IMREAD_GRAYSCALE)
    trained = write_image(tmp_path / "train" / "Covid" / "resaved.png", original)
    result = evaluate_external(tiny_model, external, training_images=hash_training_files(
        tiny_model, [("src/Covid/resaved.png", trained)], "the training split"))
    copies = result["train_copies"]
    assert copies["n"] == 1 and copies["of"] == 2 and copies["by_class"] == {"Normal": {"copies": 1, "n": 2}}
    assert copies["pairs"] == [{"file": "Normal/covid.jpeg", "train_file": "src/Covid/resaved.png", "distance": copies["pairs"][0]["distance"]}]
    assert "copies of training images: 1 of 2 (Normal 1 of 2)" in external_summary(result)
    assert "train_copies" not in evaluate_external(tiny_model, external)


def test_copies_across_labels_finds_each_cross_class_pair_once_block_by_block():
    import numpy as np

    from chest_model.duplicates import HASH_BITS, copies_across_labels

    rng = np.random.default_rng(1)
    hashes = rng.random((7, HASH_BITS)) < 0.5  # distinct films lie about 128 bits apart
    hashes[4] = hashes[0]
    hashes[5] = hashes[1]
    hashes[5, :10] ^= True  # a re-encoded copy: 10 bits off
    hashes[6] = hashes[2]   # the same film under the same label: not a conflict
    labels = [0, 0, 1, 2, 1, 1, 1]
    for chunk in (1, 3, 1024):
        assert copies_across_labels(hashes, labels, chunk=chunk) == [(0, 4, 0), (1, 5, 10)]
