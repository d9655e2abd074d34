"""Image classification data that works offline: Fashion-MNIST, CIFAR-10 and any ``datasets`` image dataset.

* ``fashion_mnist``: the IDX gz files in ``<data root>/fashion-mnist/``, parsed with numpy (no cache needed).
* ``cifar10``: the JPEG tarballs in ``<data root>/cifar10-jpeg/``, decoded with PIL once and cached as ``.npz``
  under ``$HF_LARGEBATCH_CACHE`` (default ``~/.cache/hf_largebatch``). The cache file name carries the tarball's
  size and mtime, so a changed source is decoded again; nothing is ever written into the data folder.
* anything else: a ``datasets`` dataset by hub name or local path (``load_from_disk`` folders, image folders,
  parquet...), with an ``image``/``img`` column and a ``label``/``labels`` column.

``ImageClassificationDataset`` serves ``{"pixel_values": float CxHxW normalised per channel, "labels": long}``,
with optional train-time augmentation in plain torch (random crop after zero padding, horizontal flip), since
torchvision does not import on the CPU torch used here.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dataset_dir

CACHE_ENV = "HF_LARGEBATCH_CACHE"
CACHE_FORMAT = 1  # bump when the cached arrays change meaning

FASHION_MNIST_DIR = "fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]

CIFAR10_DIR = "cifar10-jpeg"
CIFAR10_FILES = {"train": "cifar10_jpeg_train.tar.gz", "test": "cifar10_jpeg_test.tar.gz"}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

BUILTIN = {"fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist",
           "cifar10": "cifar10", "cifar-10": "cifar10", "cifar10-jpeg": "cifar10"}


@dataclass
class Augmentation:
    """Train-time augmentation: random crop of the original size after zero-padding by ``pad`` pixels (the
    padding is black in pixel space, as torchvision's ``RandomCrop(padding=pad)``), then a horizontal flip with
    probability 0.5 if ``flip``."""

    pad: int = 4
    flip: bool = True


@dataclass
class ImageData:
    """One split held in memory: ``images`` uint8 N x H x W x C, ``labels`` int64 N."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str = ""

    def __post_init__(self):
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x H x W x C, got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return self.images.shape[-1]

    def subset(self, n: int | None, seed: int = 0) -> "ImageData":
        """``n`` examples drawn at random (fixed ``seed``), or all of them. Random, not the first ``n``: the CIFAR
        tarballs are ordered by class."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageData(self.images[idx], self.labels[idx], self.class_names, self.source)


@dataclass
class ImageSplits:
    """Train and eval splits with what the model and the normalisation need."""

    name: str
    train: ImageData
    eval: ImageData
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augmentation: Augmentation = field(default_factory=Augmentation)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(bytearray(f.read()), dtype=np.uint8, offset=offset)  # writable, no copy


def load_fashion_mnist(split: str = "train") -> ImageData:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) as 28x28x1 uint8."""
    images_file, labels_file = FASHION_MNIST_FILES[_check_split(split)]
    folder = dataset_dir(FASHION_MNIST_DIR, (images_file, labels_file))
    images = _read_idx(folder / images_file, 16).reshape(-1, 28, 28, 1)
    labels = _read_idx(folder / labels_file, 8).astype(np.int64)
    return ImageData(images, labels, list(FASHION_MNIST_CLASSES), f"{folder}/{images_file}")


# ---------------------------------------------------------------------------------------------- CIFAR-10
def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/hf_largebatch").expanduser()


def _decode_cifar_tar(path: Path, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels, counts = [], [], [0] * len(CIFAR10_CLASSES)
    with tarfile.open(path, "r:gz") as tf:
        for member in tf:
            if not (member.isfile() and member.name.endswith(".jpg")):
                continue
            parts = member.name.split("/")
            if len(parts) < 3 or parts[-2] not in CIFAR10_CLASSES:
                raise ValueError(f"{path}: unexpected member {member.name!r} (want <split>/<class>/<n>.jpg)")
            label = CIFAR10_CLASSES.index(parts[-2])
            if per_class is not None and counts[label] >= per_class:
                continue
            counts[label] += 1
            with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    if not images:
        raise ValueError(f"{path} holds no CIFAR-10 JPEG images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10(split: str = "train", per_class: int | None = None, cache: bool = True) -> ImageData:
    """CIFAR-10 ``train`` (50,000) or ``test`` (10,000) as 32x32x3 uint8, in the tarball's order (by class).

    The whole split is decoded once (about 15 s for train on one core) and cached under ``$HF_LARGEBATCH_CACHE``.
    ``per_class`` decodes only the first ``per_class`` images of each class (for quick checks; never cached).
    """
    filename = CIFAR10_FILES[_check_split(split)]
    path = dataset_dir(CIFAR10_DIR, (filename,)) / filename
    source = str(path)
    if per_class is not None:
        return ImageData(*_decode_cifar_tar(path, per_class), list(CIFAR10_CLASSES), source)
    stat = path.stat()
    cached = cache_root() / CIFAR10_DIR / f"{split}-v{CACHE_FORMAT}-{stat.st_size}-{stat.st_mtime_ns}.npz"
    if cache and cached.is_file():
        try:
            with np.load(cached) as z:
                return ImageData(z["images"], z["labels"], list(CIFAR10_CLASSES), source)
        except (OSError, ValueError, KeyError):  # a damaged cache file: decode again
            pass
    images, labels = _decode_cifar_tar(path)
    if cache:
        _atomic_savez(cached, images=images, labels=labels)
    return ImageData(images, labels, list(CIFAR10_CLASSES), source)


def _atomic_savez(path: Path, **arrays) -> None:
    """Write then rename, so concurrent ranks or an interrupted run never leave a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- datasets
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
EVAL_SPLITS = ("test", "validation", "valid", "val")


def load_hf_image_dataset(name_or_path: str, image_size: int | None = None, eval_fraction: float = 0.1,
                          seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, eval) from a ``datasets`` image dataset: a folder written by ``save_to_disk`` (read with
    ``load_from_disk``), or anything ``datasets.load_dataset`` takes (hub name, image folder, parquet...).

    The eval split is ``test``, else ``validation``; without either, ``eval_fraction`` of train is held out.
    Images are decoded into memory; images of different sizes need ``image_size`` (square resize).
    """
    import datasets

    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(name_or_path)
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if "train" not in ds:
        raise ValueError(f"{name_or_path}: no 'train' split (has {list(ds)})")
    eval_name = next((s for s in EVAL_SPLITS if s in ds), None)
    train = ds["train"]
    if eval_name is None:
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = ds[eval_name]
    image_col = next((c for c in IMAGE_COLUMNS if c in train.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in train.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(f"{name_or_path}: need an image column ({'/'.join(IMAGE_COLUMNS)}) and a label column "
                         f"({'/'.join(LABEL_COLUMNS)}); found {train.column_names}")
    feature = train.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:  # integer ids 0..K-1, or strings (sorted, then numbered)
        values = set(train[label_col]) | set(evaluation[label_col])
        if all(isinstance(v, (int, np.integer)) for v in values):
            class_names = [str(i) for i in range(max(values) + 1)]
        else:
            class_names = sorted(str(v) for v in values)
    mode = _pil_mode(train[0][image_col])
    convert = lambda split: _to_image_data(split, image_col, label_col, class_names, mode, image_size,
                                           f"{name_or_path}")
    return convert(train), convert(evaluation)


def _pil_mode(image) -> str:
    if hasattr(image, "mode"):
        return "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    return "L" if np.asarray(image).ndim == 2 or np.asarray(image).shape[-1] == 1 else "RGB"


def _to_image_data(split, image_col, label_col, class_names, mode, image_size, source) -> ImageData:
    from PIL import Image

    images = []
    for image in split[image_col]:
        if not hasattr(image, "convert"):  # an array (or nested lists): uint8, or floats in [0, 1]
            array = np.asarray(image)
            if array.dtype != np.uint8:
                if array.dtype.kind == "f" and array.max(initial=0) <= 1.0:
                    array = array * 255.0
                array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
            image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        image = image.convert(mode)
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(image))
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{source}: images have different sizes ({sorted(sizes)[:4]}...); pass image_size "
                         "(--image_size) to resize them to one square size")
    labels = split[label_col]
    if not all(isinstance(v, (int, np.integer)) for v in labels):
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[str(v)] for v in labels]
    return ImageData(np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64), class_names, source)


# ---------------------------------------------------------------------------------------------- splits
def check_available(name: str) -> None:
    """Raise ``FileNotFoundError`` (path searched, ``HF_LARGEBATCH_DATA``) if a built-in dataset is missing."""
    kind = BUILTIN.get(name)
    if kind == "fashion_mnist":
        dataset_dir(FASHION_MNIST_DIR, sum(FASHION_MNIST_FILES.values(), ()))
    elif kind == "cifar10":
        dataset_dir(CIFAR10_DIR, tuple(CIFAR10_FILES.values()))


def load_image_splits(name: str, image_size: int | None = None, seed: int = 0) -> ImageSplits:
    """Full train and eval (test) splits of ``fashion_mnist``, ``cifar10`` or a ``datasets`` name / path, with
    per-channel mean/std measured on the train split and the dataset's default augmentation.

    Fashion-MNIST gets random crops (2-pixel padding) and no flip: its articles have a canonical orientation
    (every shoe points left), so flipped images never occur at test time. CIFAR-10 and other datasets get
    the usual crop with 4-pixel padding (1/8 of the side for other sizes) and a horizontal flip.
    """
    kind = BUILTIN.get(name)
    if kind == "fashion_mnist":
        train, evaluation = load_fashion_mnist("train"), load_fashion_mnist("test")
        augmentation = Augmentation(pad=2, flip=False)
    elif kind == "cifar10":
        train, evaluation = load_cifar10("train"), load_cifar10("test")
        augmentation = Augmentation(pad=4, flip=True)
    else:
        train, evaluation = load_hf_image_dataset(name, image_size=image_size, seed=seed)
        augmentation = Augmentation(pad=max(1, round(train.images.shape[1] / 8)), flip=True)
    if train.images.shape[1:] != evaluation.images.shape[1:]:
        raise ValueError(f"{name}: train images {train.images.shape[1:]} but eval images "
                         f"{evaluation.images.shape[1:]}")
    mean, std = channel_stats(train.images)
    return ImageSplits(BUILTIN.get(name, name), train, evaluation, mean, std, augmentation)


def channel_stats(images: np.ndarray, chunk: int = 2048) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x H x W x C images, in [0, 1] units (exact, from value histograms)."""
    c = images.shape[-1]
    offsets = np.arange(c, dtype=np.intp) * 256  # one histogram per channel in a single bincount
    counts = np.zeros(256 * c)
    for start in range(0, len(images), chunk):
        index = images[start:start + chunk].reshape(-1, c).astype(np.intp) + offsets
        counts += np.bincount(index.ravel(), minlength=256 * c)
    counts = counts.reshape(c, 256)
    values = np.arange(256, dtype=np.float64)
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = (counts * np.square(values[None, :] - mean[:, None])).sum(1) / n
    return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist()


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``{"pixel_values": float32 C x H x W, "labels": int64}``, normalised with ``mean``/``std`` (in [0, 1] pixel
    units). ``augmentation`` applies per example with torch's global RNG (seeded by the Trainer).
    ``num_channels`` greater than the data's repeats grayscale into RGB (for a pretrained RGB model)."""

    def __init__(self, data: ImageData, mean, std, augmentation: Augmentation | None = None,
                 num_channels: int | None = None):
        self.data = data
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)  # N C H W, a view
        self.labels = torch.from_numpy(data.labels)
        channels = data.num_channels
        target = num_channels or channels
        if target != channels and channels != 1:
            raise ValueError(f"the model takes {target} channels but the images have {channels}")
        self.repeat = target if channels == 1 and target != 1 else 1
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
        # (x / 255 - mean) / std  ==  x * scale + shift
        self.scale = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self.shift = (-mean / std).view(-1, 1, 1)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        aug = self.augmentation
        if aug is not None:
            if aug.pad > 0:
                c, h, w = image.shape
                padded = image.new_zeros((c, h + 2 * aug.pad, w + 2 * aug.pad))
                padded[:, aug.pad:aug.pad + h, aug.pad:aug.pad + w] = image
                dy, dx = torch.randint(0, 2 * aug.pad + 1, (2,)).tolist()
                image = padded[:, dy:dy + h, dx:dx + w]
            if aug.flip and torch.rand(()) < 0.5:
                image = image.flip(-1)
        pixels = image.float() * self.scale + self.shift
        if self.repeat > 1:
            pixels = pixels.expand(self.repeat, -1, -1)
        return {"pixel_values": pixels.contiguous(), "labels": self.labels[i]}


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split
