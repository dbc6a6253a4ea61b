"""Class-folder datasets: discovery and validation, the stratified split, the decode-once cache and
training augmentation.

Every file is decoded once per run (JPEGs at reduced scale), resized once to the model's input size
and kept as uint8. Augmentation then works on these small tensors, never on the multi-megapixel
original, and normalization happens on the batch through the model's :class:`Preprocessor`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ChestModelError
from .preprocess import IMAGE_EXTENSIONS, ImageLoadError, Preprocessor, file_format, load_image

logger = logging.getLogger(__name__)


class DatasetError(ChestModelError, ValueError):
    """A data folder that cannot be trained on; the message lists every problem, file by file."""


# Folder names that say which split a folder is, not which collection it comes from.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


@dataclass
class ImageFolder:
    """Image files with their class and source (the data root each came from)."""

    root: Path
    class_names: list[str]
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    source_names: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.class_names)}

    def counts_by_source(self) -> dict[str, dict[str, int]]:
        return {source: {name: sum(1 for l, s in zip(self.labels, self.sources) if l == i and s == k)
                         for i, name in enumerate(self.class_names)}
                for k, source in enumerate(self.source_names)}


def source_name(path: str | Path) -> str:
    """A data root's default source name: its folder name, or its parent's for split folders (``covid19-dataset/train``)."""
    path = Path(path).absolute()
    return path.parent.name if path.name.lower() in SPLIT_NAMES and path.parent.name else path.name


def relative_name(path: str | Path, root: str | Path) -> str:
    """A file's name relative to its data folder: metrics files and cards carry no local paths.

    As listed first (a symlinked file keeps its place in the folder), then resolved (a root given
    through a symlink), else the bare file name."""
    listed, top = Path(path).absolute(), Path(root).absolute()
    for file, folder in ((listed, top), (listed, top.resolve()), (listed.resolve(), top.resolve())):
        try:
            return str(file.relative_to(folder))
        except ValueError:
            continue
    return Path(path).name


def relative_message(message: str, path: str | Path, root: str | Path) -> str:
    """A message that starts with ``path``, starting with its name relative to ``root`` instead."""
    return relative_name(path, root) + message[len(str(path)):] if message.startswith(str(path)) else message


SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def split_data_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH (which may itself hold "=") -> (None, PATH): a spec
    that is itself an existing path, where its PATH part is not, is that path."""
    name, sep, path = spec.partition("=")
    if not sep or not name or "/" in name or os.sep in name:
        return None, spec
    if Path(spec).exists() and not Path(path).exists():
        return None, spec
    return name, path


def parse_data_dirs(specs: list[str]) -> list[tuple[str, Path]]:
    """``[NAME=]PATH`` arguments -> unique (name, path) pairs, each folder given once."""
    pairs = []
    for spec in specs:
        if spec.startswith("="):
            raise DatasetError(f"{spec!r}: empty NAME before '='; write NAME=PATH, or the PATH alone")
        name, path = split_data_spec(spec)
        if name is not None and Path(spec).exists():
            other = path if os.path.isabs(path) else os.path.join(".", path)
            raise DatasetError(f"{spec!r}: is a folder, and also reads as NAME=PATH ({name!r} = {path}); say which: "
                               f"'data={spec}' for the folder {spec}, or '{name}={other}' for {path}")
        if name is None and "=" in spec and not Path(spec).exists():
            raise DatasetError(f"{spec!r}: no such folder; as NAME=PATH, a NAME cannot contain '/' (it names the "
                               "set's report folder)")
        if not path:  # Path("") would be the working folder
            raise DatasetError(f"{spec!r}: no PATH after '='; write NAME=PATH")
        name = name or source_name(path)
        if name in ("", ".", "..") or "/" in name or os.sep in name:  # names become the reports' folder names
            raise DatasetError(f"{spec!r}: {name!r} cannot name a data set; give one with NAME=PATH (a word)")
        pairs.append((name, Path(path)))
    names = [name for name, _ in pairs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"two data folders share the source name(s) {duplicates}; give each folder its own NAME with NAME=PATH")
    # The same images under two names would count twice (and leak between training and validation).
    real = [(name, Path(os.path.realpath(path))) for name, path in pairs]
    for i, (name, folder) in enumerate(real):
        for other, inner in real[i + 1:]:
            if folder == inner or folder in inner.parents or inner in folder.parents:
                raise DatasetError(f"data sets {name!r} ({pairs[i][1]}) and {other!r} share files: one folder is "
                                   "the other or lies inside it; give each folder once")
    return pairs


def folders_shared_with_training(sources: list[tuple[str, Path]], others: list[tuple[str, Path]]) -> list[str]:
    """A validation, test or external folder that is a training folder, or lies inside one or around
    one, would score training images as unseen: one problem line for each."""
    problems = []
    for flag, path in others:
        real = Path(os.path.realpath(path))
        for name, folder in sources:
            trained = Path(os.path.realpath(folder))
            if real == trained or trained in real.parents or real in trained.parents:
                problems.append(f"{flag} {path}: shares files with the training data {name!r} ({folder}): its "
                                "images would be scored as unseen; give a folder of other images")
    return problems


def _is_dicom_by_content(path: Path) -> bool:
    return file_format(path) == "DICOM"


def is_image_file(path: Path) -> bool:
    """Known image extensions in any case, plus DICOM files recognised by content (they often have none)."""
    if path.name.startswith("."):
        return False
    if not path.is_file():  # a broken link with an image's name is listed, so that decoding names it
        return path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_EXTENSIONS
    return path.suffix.lower() in IMAGE_EXTENSIONS or _is_dicom_by_content(path)


def image_files_under(folder: str | Path) -> list[Path]:
    """Every image file below ``folder``, sorted: hidden files and folders (``.thumbs/``, ``.git/``)
    skipped, symlinked folders followed (each real folder once, so a link loop ends)."""
    found, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [path for name in names if is_image_file(path := Path(top) / name)]
    return sorted(found)


def scan_image_folder(root: str | Path, class_names: list[str], *, partial: bool = False,
                      name: str | None = None) -> tuple[ImageFolder, list[str]]:
    """List ``root/<class>/<image>`` files; return the folder and a list of problems (empty when fine).

    With ``partial``, a root may hold only some of the classes (an external set of adult normals).
    """
    root = Path(root)
    problems: list[str] = []
    folder = ImageFolder(root, list(class_names), source_names=[name or source_name(root)])
    if root.exists() and not root.is_dir():
        return folder, [f"{root}: is a file, not a data folder (a data folder holds one folder per class)"]
    if not root.is_dir():
        return folder, [f"{root}: data folder does not exist"]
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = [name for name in present if name not in class_names]
    if extra:
        by_case = {c.casefold(): c for c in class_names}
        split_folders = sorted((n for n in extra if n.casefold() in SPLIT_FOLDER_NAMES and (root / n).is_dir()
                                and any((root / n / c).is_dir() for c in class_names)),
                               key=lambda n: not n.casefold().startswith("train"))  # the training folder first
        if split_folders:
            hint = (f"it holds split folders, each with class folders: pass one of them, e.g. "
                    f"{root / split_folders[0]}")
        elif all(n.casefold() in by_case for n in extra):
            hint = "only the letter case differs: rename " + ", ".join(f"{n!r} to {by_case[n.casefold()]!r}" for n in extra)
        else:
            hint = "rename them to those names; a model of other classes is trained with train.py --class-names"
        problems.append(f"{root}: class folder(s) {extra} do not match the model's classes {list(class_names)} ({hint})")
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        logger.warning("%s: %d image(s) lie directly in the data folder, outside every class folder, and are left out",
                       root, len(loose))
    if partial and not any(n in class_names for n in present):
        problems.append(f"{root}: none of the class folders {list(class_names)} is here")
    for label, class_name in enumerate(class_names):
        class_dir = root / class_name
        if not class_dir.is_dir():
            if not partial:
                problems.append(f"{class_dir}: missing class folder for '{class_name}'")
            continue
        files = image_files_under(class_dir)
        if not files:
            problems.append(f"{class_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}, any case)")
        folder.paths.extend(files)
        folder.labels.extend([label] * len(files))
    folder.sources = [0] * len(folder.paths)
    return folder, problems


def scan_sources(sources: list[tuple[str, Path]], class_names: list[str]) -> tuple[ImageFolder, list[str]]:
    """Several data roots merged by class folder name; each file keeps its source.

    One root must hold every class (the tutorial's layout). With several, a root may hold only some
    classes, but every class needs images in at least one of them.
    """
    if len(sources) == 1:
        name, root = sources[0]
        return scan_image_folder(root, class_names, name=name)
    merged = ImageFolder(Path(sources[0][1]), list(class_names), source_names=[name for name, _ in sources])
    problems: list[str] = []
    for index, (name, root) in enumerate(sources):
        folder, more = scan_image_folder(root, class_names, partial=True, name=name)
        problems += more
        merged.paths += folder.paths
        merged.labels += folder.labels
        merged.sources += [index] * len(folder.paths)
    if not problems:
        empty = [name for i, name in enumerate(class_names) if i not in merged.labels]
        if empty:
            roots = ", ".join(str(root) for _, root in sources)
            problems.append(f"no images for class(es) {empty} in any of {roots}")
    return merged, problems


def stratified_split(labels: list[int], fraction: float, seed: int, sources: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Indices of a seeded split that keeps each class's share in both parts (each class x source's with ``sources``).

    A class x source group with a single image is stratified with its class alone.
    """
    from sklearn.model_selection import train_test_split

    n, k = len(labels), len(set(labels))
    size = max(k, int(np.ceil(fraction * n)))  # as scikit-learn rounds; at least one image per class
    if not 0 < fraction < 1 or n - size < k or min(np.bincount(labels)) < 2:
        raise DatasetError(
            f"cannot split {n} images ({k} classes, smallest class {min(np.bincount(labels))}) into train and "
            f"validation with --val-split {fraction}; add images or pass --val-dir"
        )
    strata = _strata(labels, sources)
    if len(set(strata)) > min(size, n - size):  # more groups than either part can hold one of
        strata = list(labels)
    indices = np.arange(n)
    train_idx, val_idx = train_test_split(indices, test_size=size, stratify=strata, random_state=seed)
    train_idx, val_idx = _every_class_in_both(labels, train_idx.tolist(), val_idx.tolist(), seed)
    return sorted(train_idx), sorted(val_idx)


def _every_class_in_both(labels: list[int], train: list[int], val: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Stratified rounding can leave a small class out of one part (2 images, a 20% split); an image
    of that class is moved over (seeded), so validation measures, and training learns, every class."""
    rng = np.random.default_rng(seed)
    for label in sorted(set(labels)):
        for give, take in ((train, val), (val, train)):
            if not any(labels[i] == label for i in take):
                candidates = [i for i in give if labels[i] == label]
                moved = candidates[int(rng.integers(len(candidates)))]
                give.remove(moved)
                take.append(moved)
    return train, val


def _strata(labels: list[int], sources: list[int] | None) -> list:
    """Class x source groups. A group of one image joins its class's stratum; where that leaves a
    stratum of one image (scikit-learn needs two in each), its whole class is stratified by class alone."""
    if sources is None or len(set(sources)) < 2:
        return list(labels)
    groups = list(zip(labels, sources))
    counts = Counter(groups)
    strata = [f"{label}/{source}" if counts[(label, source)] >= 2 else str(label) for label, source in groups]
    sizes = Counter(strata)
    thin = {label for label, stratum in zip(labels, strata) if sizes[stratum] < 2}
    return [str(label) if label in thin else stratum for label, stratum in zip(labels, strata)]


def decode_folder(
    paths: list[Path], preprocessor: Preprocessor, *, num_threads: int | None = None
) -> tuple[torch.Tensor, list[str | None], list[float]]:
    """Decode and resize every file once: a ``(N, 3, S, S)`` uint8 tensor, per-file errors (None if ok),
    and each decoded image's mean chroma (measured before any contrast normalisation greys it)."""
    from .ood import chroma

    size = preprocessor.image_size
    images = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8)
    errors: list[str | None] = [None] * len(paths)
    chromas = [0.0] * len(paths)

    def work(i: int) -> None:
        try:
            image = load_image(paths[i], min_size=size)
            chromas[i] = chroma(image)
            images[i] = preprocessor.to_uint8_tensor(image)
        except ImageLoadError as err:
            errors[i] = str(err)

    # OpenCV releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(paths))))
    return images, errors, chromas


def build_train_augmentation(kind: str = "standard", preprocessor: Preprocessor | None = None):
    """Training augmentation on uint8 ``(3, S, S)`` tensors (torchvision transforms v2), or None for ``"none"``.

    ``"standard"``: small, anatomy-preserving changes.
    - RandomAffine: patient position and framing differ between radiographs by a few degrees and a
      few percent; larger rotations or flips would create anatomy (heart on the right) that never occurs.
    - ColorJitter on brightness/contrast: exposure and detector response vary between machines.
      Hue/saturation jitter is meaningless on grayscale X-rays.

    ``"framing"``: ``"standard"`` after a random crop of 50-100% of the area, of a slightly other
    aspect ratio, resized back. Collections frame the chest differently (the tutorial's Covid films
    are often cropped tight, the adult normals show the whole thorax with margins), and a model
    trained without it calls a normal adult film Covid when it is merely cropped tighter. The
    ``preprocessor``'s per-image contrast normalisation is then applied to the crop, as inference
    applies it to a film framed that way: the cached images were normalised whole, and a crop of one
    keeps the whole film's grey levels, which no input at inference has. (Trained without that
    step, a model learned crops with the whole film's levels and still called re-normalised crops
    of normal adult films Covid.) ``"standard"`` and ``"acquisition"`` keep augmenting the
    normalised image, so that recorded commands train as they did.

    ``"acquisition"`` adds what differs between *sources* rather than patients, so that the model
    cannot tell the collections apart by it: tighter or looser framing (crops), detector and
    processing curves (gamma, stronger contrast), resolution (blur), noise and JPEG compression.

    ``"devices"``: ``"standard"``, then on half the images of every class synthetic monitoring leads
    with their wires, a tube or line, and burnt-in markers ("AP", "PORTABLE", ...). The tutorial's
    Covid films are mostly portable ICU films that carry them, and the adult normals were selected
    without devices, so a model can learn "leads = Covid": drawn leads alone raised a model's mean
    Covid probability on normal adult films from 0.02 to 0.16.
    """
    if kind == "none":
        return None
    from torchvision.transforms import v2

    standard = [
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ]
    if kind == "standard":
        return v2.Compose(standard)
    if kind == "devices":
        return v2.Compose([*standard, RandomDevices(p=0.5)])
    if kind == "framing":
        contrast = [preprocessor.normalize_contrast_tensor] if preprocessor is not None else []
        return v2.Compose([RandomCropResize(scale=(0.5, 1.0), ratio=(0.8, 1.25)), *standard, *contrast])
    if kind != "acquisition":
        raise ValueError(f"unknown augmentation {kind!r}; expected 'standard', 'framing', 'acquisition', 'devices' or 'none'")
    return v2.Compose([
        RandomCropResize(scale=(0.7, 1.0), ratio=(0.8, 1.25)),
        v2.RandomAffine(degrees=7, translate=(0.03, 0.03)),
        v2.ColorJitter(brightness=0.3, contrast=0.4),
        RandomGamma((0.7, 1.4), p=0.5),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.3),
        RandomNoise(max_std=8.0, p=0.3),
        v2.RandomApply([v2.JPEG((30, 95))], p=0.3),
    ])


class RandomCropResize:
    """RandomResizedCrop back to the image's own size (it is cached at the model's input size)."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]):
        self.scale, self.ratio = scale, ratio

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2

        return v2.RandomResizedCrop(tuple(image.shape[-2:]), scale=self.scale, ratio=self.ratio, antialias=True)(image)


class RandomGamma:
    """A random gamma curve: detectors and their post-processing map dose to grey differently."""

    def __init__(self, gamma: tuple[float, float], p: float):
        self.gamma, self.p = gamma, p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        from torchvision.transforms.v2 import functional as F

        return F.adjust_gamma(image, float(torch.empty(()).uniform_(*self.gamma)))


class RandomDevices:
    """Synthetic radio-opaque devices on a uint8 ``(C, H, W)`` image, with probability ``p``: one to four
    ECG lead snaps with wires running off the film, sometimes a tube or line down the middle, sometimes
    burnt-in text markers. Every channel gets the same bright overlay; torch's generator draws every
    choice, so a seeded dataset sees the same overlays on a resume."""

    MARKERS = ("AP", "PORTABLE", "SUPINE", "L", "R", "ERECT")

    def __init__(self, p: float):
        self.p = p

    def _uniform(self, low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        import cv2

        height, width = image.shape[-2:]
        side = min(height, width)
        line = max(1, round(side / 160))
        mask = np.zeros((height, width), np.uint8)
        for _ in range(int(torch.randint(1, 5, ()))):
            snap = (round(self._uniform(0.1, 0.9) * width), round(self._uniform(0.1, 0.75) * height))
            cv2.circle(mask, snap, max(1, round(self._uniform(0.01, 0.025) * side)), 255, -1, cv2.LINE_AA)
            bend = (snap[0] + round(self._uniform(-0.3, 0.3) * width), snap[1] + round(self._uniform(0.1, 0.4) * height))
            end = (round(self._uniform(0, 1) * width), height - 1) if torch.rand(()) < 0.7 else \
                (0 if torch.rand(()) < 0.5 else width - 1, round(self._uniform(0.3, 1) * height))
            cv2.polylines(mask, [np.array([snap, bend, end], np.int32)], False, 255, line, cv2.LINE_AA)
        if torch.rand(()) < 0.3:  # an endotracheal or nasogastric tube, roughly down the midline
            x = self._uniform(0.45, 0.55) * width
            path = [(round(x), 0), (round(x + self._uniform(-0.03, 0.03) * width), round(height * self._uniform(0.25, 0.4))),
                    (round(x + self._uniform(-0.05, 0.08) * width), round(height * self._uniform(0.45, 0.8)))]
            cv2.polylines(mask, [np.array(path, np.int32)], False, 255, line + 1, cv2.LINE_AA)
        if torch.rand(()) < 0.5:
            for _ in range(int(torch.randint(1, 3, ()))):
                text = self.MARKERS[int(torch.randint(len(self.MARKERS), ()))]
                scale = self._uniform(0.0025, 0.004) * side
                (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, line)
                corner = (round(self._uniform(0.02, 0.95) * max(1, width - w)), round(h + self._uniform(0.02, 0.2) * height))
                cv2.putText(mask, text, corner, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, line, cv2.LINE_AA)
        brightness = self._uniform(0.8, 1.0)
        overlay = torch.from_numpy(mask).float() / 255 * brightness * 255  # devices are brighter than tissue
        return torch.maximum(image.float(), overlay.expand_as(image)).round().to(torch.uint8)


class RandomNoise:
    """Additive Gaussian noise on uint8 images (quantum noise differs with dose and detector)."""

    def __init__(self, max_std: float, p: float):
        self.max_std, self.p = max_std, p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        std = float(torch.empty(()).uniform_(0, self.max_std))
        return (image.float() + torch.randn(image.shape) * std).round().clamp(0, 255).to(torch.uint8)


class BalancedSampler(torch.utils.data.Sampler):
    """Draws samples with replacement so that no class or source dominates.

    ``by="class"``: every class equally often and, within a class, each source equally often.
    ``by="group"``: every (source, class) group equally often, so that a source's rarer class (the
    children's Normal films beside their Viral Pneumonia) is drawn as often as any other group.
    The class prior this leaves is ``class_prior()``; training corrects for it in the loss.
    ``by="source"``: classes equally often *within* every source that holds several; sources that
    hold a single class (supplements, such as adult normals) together weigh as one group of that
    class. Where a source's classes come from different populations (the Kaggle set's adult Covid
    films and its children's Normal and Viral Pneumonia films), balancing the classes overall
    skews each population: with one Normal class spread over children and adults, children draw
    Normal:Viral Pneumonia 1:3 under ``by="class"``. Here each population is drawn 1:1.

    ``strata`` (one label per sample, e.g. each film's view) splits every group's share equally
    between the strata found in it, so a rare kind of film inside a group (a source's 38 AP normals
    beside its 101 PA ones) is drawn as often as the common kind.

    Without either, a pool that is mostly one source's Normal images teaches "mostly Normal". The
    draw of epoch ``e`` depends only on ``(seed, e)``, so every process and a resumed run see the
    same order.
    """

    def __init__(self, labels: list[int], sources: list[int], seed: int = 0, num_samples: int | None = None,
                 by: str = "class", strata: list[str] | None = None):
        self.weights = balanced_weights(labels, sources, by=by, strata=strata)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_samples = num_samples or len(labels)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()

    def class_prior(self, num_classes: int) -> torch.Tensor:
        """The expected share of draws of each class."""
        mass = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)
        return mass / mass.sum()


def balanced_weights(labels: list[int], sources: list[int], by: str = "class",
                     strata: list[str] | None = None) -> torch.Tensor:
    """Relative per-sample weights for ``BalancedSampler``: equal mass per class split equally
    between its sources (``by="class"``), equal mass per (source, class) group (``by="group"``), or
    equal mass per group of a several-class source, single-class sources of a class sharing one
    group's mass (``by="source"``). With ``strata``, each group's mass is split equally between the
    strata of its samples."""
    if by not in ("class", "group", "source"):
        raise ValueError(f"by must be 'class', 'group' or 'source', not {by!r}")
    if strata is not None and len(strata) != len(labels):
        raise ValueError(f"strata has {len(strata)} entries for {len(labels)} samples")
    groups: dict[tuple[int, int], int] = {}
    for group in zip(labels, sources):
        groups[group] = groups.get(group, 0) + 1
    # a group's mass is 1 / shares; each sample gets 1 / (shares * group size)
    if by == "group":
        shares = dict.fromkeys(groups, 1)
    elif by == "source":
        classes_per_source = {s: sum(1 for (_, source) in groups if source == s) for _, s in groups}
        single = {g for g in groups if classes_per_source[g[1]] == 1}
        singles_per_class = {c: sum(1 for (label, _) in single if label == c) for c, _ in single}
        shares = {g: singles_per_class[g[0]] if g in single else 1 for g in groups}
    else:
        sources_per_class = {c: sum(1 for (label, _) in groups if label == c) for c, _ in groups}
        shares = {(label, source): sources_per_class[label] for label, source in groups}
    strata = strata if strata is not None else [None] * len(labels)  # one stratum: the group's mass as is
    cells = Counter(zip(labels, sources, strata))
    strata_per_group = Counter((label, source) for label, source, _ in cells)
    return torch.tensor([1.0 / (shares[(label, source)] * strata_per_group[(label, source)] * cells[(label, source, stratum)])
                         for label, source, stratum in zip(labels, sources, strata)], dtype=torch.float64)


def derived_seed(*parts: int) -> int:
    """A seed that depends only on ``parts`` (unlike ``hash``, stable across Python versions and processes)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class CachedImageDataset(Dataset):
    """uint8 images in memory with their labels; optional augmentation, reproducible per epoch.

    The augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``, so a resumed
    run, or a run with a different number of workers or processes, sees the same images.
    """

    def __init__(self, images: torch.Tensor, labels: list[int], transform=None, seed: int = 0):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return image, self.labels[index]
