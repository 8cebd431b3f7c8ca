"""Datasets loaded once into uint8 tensors ``[N, C, H, W]`` with integer labels.

Layouts: scikit-learn's bundled ``digits``; MNIST in torchvision's raw IDX layout; CIFAR-10/100 either in
torchvision's ``cifar-*-python`` pickles or in the image-folder layout LibContinual reads
(``data_root/{train,test}/<class>/<image>``, class index = position of the folder name in sorted order).
Decoded image folders are cached outside the data folder, so a second run starts in seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.errors import DataError
from harness.paths import cache_dir

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class ImageDataset:
    """Train and test images of the loaded classes; labels are the dataset's own class indices."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    needs_root: bool
    load: Callable[[Path | None, list[int]], tuple[torch.Tensor, ...]]


def _select(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = np.isin(y, classes)
    return torch.from_numpy(np.ascontiguousarray(x[keep])), torch.from_numpy(y[keep].astype(np.int64))


def _load_digits(_root: Path | None, classes: list[int]) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits; every fifth image of each class is the test set (no official split)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    rank = np.zeros_like(labels)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    test = rank % 5 == 4
    return (*_select(images[~test], labels[~test], classes), *_select(images[test], labels[test], classes))


def _read_idx(path: Path, expected_count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) >= 4 else 0
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) < header or dims != (expected_count, *item_shape) or len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: corrupt or truncated IDX file (header says {dims}, "
                        f"{len(raw) - header} data bytes; expected {(expected_count, *item_shape)})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}: missing MNIST file")


def _load_mnist(root: Path | None, classes: list[int]) -> tuple[torch.Tensor, ...]:
    assert root is not None
    raw = next((p for p in (root / "MNIST" / "raw", root / "raw", root) if (p / "t10k-labels-idx1-ubyte").exists()
                or (p / "t10k-labels-idx1-ubyte.gz").exists()), root / "MNIST" / "raw")
    parts = []
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        x = _read_idx(_find_file(raw, f"{prefix}-images-idx3-ubyte"), count, (28, 28))[:, None]
        y = _read_idx(_find_file(raw, f"{prefix}-labels-idx1-ubyte"), count, ()).astype(np.int64)
        if y.max() > 9:
            raise DataError(f"{raw}: MNIST labels out of range 0..9")
        parts.extend(_select(x, y, classes))
    return tuple(parts)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR file")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign pickle raises many different types
        raise DataError(f"{path}: corrupt CIFAR file ({type(exc).__name__})") from None


def _cifar_arrays(batches: list[dict], label_key: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise DataError(f"{path}: CIFAR file lacks key {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: CIFAR arrays have shape {data.shape}, expected [N, 3072]")
    return data.reshape(-1, 3, 32, 32), labels


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def list_class_folders(root: Path) -> list[str]:
    train = root / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []


def _decode_folder(root: Path, split: str, names: list[str], classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    files, labels = [], []
    for c in classes:
        folder = root / split / names[c]
        if not folder.is_dir():
            raise DataError(f"{folder}: missing class folder")
        members = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise DataError(f"{folder}: no images")
        files += members
        labels += [c] * len(members)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        images = list(pool.map(_decode_image, files, chunksize=256))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{root / split}: images of different sizes {sorted(shapes)[:3]}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def _folder_fingerprint(root: Path, names: list[str], classes: list[int]) -> str:
    digest = hashlib.sha256(str(root.resolve()).encode())
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / names[c]
            stat = folder.stat() if folder.is_dir() else None
            count = sum(1 for _ in folder.iterdir()) if stat else -1
            digest.update(f"{split}/{names[c]}:{count}:{stat.st_mtime_ns if stat else 0}".encode())
    return digest.hexdigest()[:24]


def _load_image_folder(root: Path, classes: list[int], num_classes: int) -> tuple[torch.Tensor, ...]:
    names = list_class_folders(root)
    if len(names) != num_classes:
        raise DataError(f"{root / 'train'}: found {len(names)} class folders, expected {num_classes}")
    cache = cache_dir() / f"imagefolder-{_folder_fingerprint(root, names, classes)}.pt"
    if cache.is_file():
        try:
            return tuple(torch.load(cache, weights_only=True))
        except Exception:  # a stale or partial cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    tensors = (*_decode_folder(root, "train", names, classes), *_decode_folder(root, "test", names, classes))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save(list(tensors), tmp)
    tmp.replace(cache)
    return tensors


def _cifar_loader(num_classes: int) -> Callable[[Path | None, list[int]], tuple[torch.Tensor, ...]]:
    python_dir, label_key = ("cifar-100-python", b"fine_labels") if num_classes == 100 else ("cifar-10-batches-py", b"labels")
    train_files = ["train"] if num_classes == 100 else [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test"] if num_classes == 100 else ["test_batch"]

    def load(root: Path | None, classes: list[int]) -> tuple[torch.Tensor, ...]:
        assert root is not None
        if (root / "train").is_dir():
            return _load_image_folder(root, classes, num_classes)
        folder = root / python_dir if (root / python_dir).is_dir() else root
        if not (folder / train_files[0]).exists():
            raise DataError(f"{root}: neither the image-folder layout (train/<class>/) nor {python_dir}/ found")
        parts = []
        for files in (train_files, test_files):
            x, y = _cifar_arrays([_unpickle(folder / f) for f in files], label_key, folder)
            parts.extend(_select(x, y, classes))
        return tuple(parts)

    return load


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, (1, 8, 8), (0.3336,), (0.3754,), False, _load_digits),
    "mnist": DatasetInfo(10, (1, 28, 28), (0.1307,), (0.3081,), True, _load_mnist),
    "cifar10": DatasetInfo(10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, _cifar_loader(10)),
    "cifar100": DatasetInfo(100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                            _cifar_loader(100)),
}


def check_data_root(name: str, root: Path | None) -> None:
    """Fail before training when the data folder is missing (the loaders check the files themselves)."""
    info = DATASETS[name]
    if info.needs_root and (root is None or not root.is_dir()):
        raise DataError(f"{root}: data_root for dataset {name!r} does not exist" if root else
                        f"dataset {name!r} needs split.data_root")


def load_dataset(name: str, root: Path | None, classes: list[int]) -> ImageDataset:
    """Load the train and test images of ``classes`` (dataset class indices) as uint8 tensors."""
    info = DATASETS[name]
    check_data_root(name, root)
    train_x, train_y, test_x, test_y = info.load(root, sorted(classes))
    missing = sorted(set(classes) - set(train_y.unique().tolist()))
    if missing:
        raise DataError(f"{root}: dataset {name!r} has no training images for classes {missing[:10]}")
    return ImageDataset(name, train_x, train_y, test_x, test_y, info.mean, info.std)
