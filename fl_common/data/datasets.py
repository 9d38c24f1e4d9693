"""Whole datasets as in-memory tensors, loaded once per process.

Federated simulation runs hundreds of clients over the same data in one process, so every client
indexing one shared float32 tensor is far cheaper than a torchvision ``Dataset`` building a PIL
image per sample. The loaders here therefore do all decoding and normalisation up front, once,
and hand out the same tensors on every later call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fl_common.data.decoded_cache import decoded_idx
from fl_common.data.idx import IdxFormatError, find_idx_file, read_idx
from fl_common.data.synthetic import SYNTHETIC_NUM_CLASSES, make_synthetic

__all__ = [
    "DATASETS",
    "SPLITS",
    "NORMALISATION",
    "DatasetUnavailable",
    "ArrayDataset",
    "RawImages",
    "load_dataset",
    "load_raw_images",
    "warm_decoded_cache",
    "images_to_tensor",
    "clear_cache",
    "default_download_root",
]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic")
SPLITS = ("train", "test")

# Standard per-channel (mean, std) of the training split in [0, 1] pixel units. Fixed constants,
# not statistics of whatever was loaded, so that every client normalises identically even when
# each one only ever sees its own shard.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "synthetic": SYNTHETIC_NUM_CLASSES}


@dataclass(frozen=True)
class _IdxSpec:
    torchvision_class: str  # also the folder name torchvision uses: <root>/<class>/raw
    system_dir: Path | None  # where a distribution package installs it, if one does
    install_hint: str | None


_IDX_SPECS = {
    "fashion_mnist": _IdxSpec(
        "FashionMNIST", Path("/usr/share/datasets/fashion-mnist"), "apt-get install dataset-fashion-mnist"
    ),
    "mnist": _IdxSpec("MNIST", None, None),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be had as asked (missing, corrupt, or download failed); the message says how to fix it."""


@dataclass(eq=False)
class ArrayDataset:
    """A whole dataset held in memory as normalised tensors; batches are made by indexing (no PIL on the training path).

    Tensors returned by :func:`load_dataset` are shared through its cache: never modify ``x`` or
    ``y`` in place (``subset`` and indexing return copies, which are safe to modify).
    """

    x: torch.Tensor = field(repr=False)  # float32 [N, C, H, W], already normalised
    y: torch.Tensor = field(repr=False)  # int64 [N]
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        # Checked here because a mismatch would otherwise surface as an index error mid-round.
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayDataset {self.name!r}: x must be [N, C, H, W] and y [N] with the same N, "
                f"got x {tuple(self.x.shape)} and y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"ArrayDataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W): what a model needs to size its first layer."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ArrayDataset:
        """A client's slice of the data, as fresh tensors (copies, so they are the client's own)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"subset indices must lie in [0, {len(self)}), got range [{int(idx.min())}, {int(idx.max())}]"
            )
        return ArrayDataset(self.x.index_select(0, idx), self.y.index_select(0, idx), self.num_classes, self.name)


# --------------------------------------------------------------------------------------------- #
# conversion


def images_to_tensor(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 images, [N, H, W] or channels-last [N, H, W, C], to normalised float32 [N, C, H, W].

    Writes straight into one preallocated float32 tensor and normalises it in place, so the peak
    is the uint8 input plus the float32 output: no float64 or second float32 copy of the set.
    """
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        chw = arr[:, None, :, :]
    elif arr.ndim == 4:
        chw = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {arr.shape}")
    channels = chw.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"need one mean/std per channel ({channels}), got {len(mean)} and {len(std)}")
    out = torch.empty(chw.shape, dtype=torch.float32)
    out.numpy()[...] = chw  # uint8 -> float32 cast during the copy
    # (x/255 - m)/s == x * (1/(255 s)) - m/s: two in-place passes instead of three.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, channels, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, channels, 1, 1)
    return out.mul_(scale).sub_(shift)


def _labels_to_tensor(labels: np.ndarray | torch.Tensor | Sequence[int], num_classes: int, source: str) -> torch.Tensor:
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    y = torch.from_numpy(np.array(arr, dtype=np.int64).reshape(-1))  # copy: idx buffers are read-only
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetUnavailable(
            f"{source}: labels span [{int(y.min())}, {int(y.max())}], expected [0, {num_classes}); the file is corrupt"
        )
    return y


# --------------------------------------------------------------------------------------------- #
# cache

_CACHE: dict[tuple[str, str, str], ArrayDataset] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Drop every cached dataset (tests, or to free memory once a run is done with its data)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached(key: tuple[str, str, str], loader: Callable[[], ArrayDataset]) -> ArrayDataset:
    # One lock for all loads: concurrent first calls (threads of a simulation) then parse once.
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _CACHE[key] = loader()
        return hit


def default_download_root() -> Path:
    """Where downloads go when no data_dir is given: a per-user cache, never the working directory."""
    return Path.home() / ".cache" / "fl_common" / "datasets"


# --------------------------------------------------------------------------------------------- #
# loaders


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _find_idx_pair(name: str, split: str, data_dir: Path | None) -> tuple[Path, Path] | None:
    spec = _IDX_SPECS[name]
    if data_dir is not None:
        dirs = [data_dir, data_dir / spec.torchvision_class / "raw"]
    else:
        dirs = [spec.system_dir] if spec.system_dir is not None else []
    prefix = _IDX_PREFIX[split]
    for directory in dirs:
        images = find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
        labels = find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _checked_idx_pair(images_path: Path, labels_path: Path, *, cached: bool) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of an idx pair (``cached``: memory-mapped from the decoded-data cache), checked."""
    try:
        if cached:
            images = decoded_idx(images_path, expect_ndim=3)
            labels = decoded_idx(labels_path, expect_ndim=1)
        else:
            images = read_idx(images_path, expect_ndim=3)
            labels = read_idx(labels_path, expect_ndim=1)
    except IdxFormatError as exc:
        raise DatasetUnavailable(f"{exc}; re-fetch the file") from exc
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DatasetUnavailable(f"{images_path}: expected unsigned-byte idx files, got {images.dtype}/{labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetUnavailable(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "the files do not belong together"
        )
    return images, labels


def _from_idx(name: str, images_path: Path, labels_path: Path) -> ArrayDataset:
    images, labels = _checked_idx_pair(images_path, labels_path, cached=False)
    mean, std = NORMALISATION[name]
    y = _labels_to_tensor(labels, _NUM_CLASSES[name], str(labels_path))
    return ArrayDataset(images_to_tensor(images, mean, std), y, _NUM_CLASSES[name], name)


@dataclass(frozen=True, eq=False)
class RawImages:
    """An idx dataset's pixels as stored (uint8 [N, H, W], read-only, memory-mapped from the decoded-data cache)
    and its labels: a client daemon picks its few hundred rows and normalises only those (:meth:`rows`), instead
    of holding the whole split as float32 (188 MB for Fashion-MNIST's training split, per process)."""

    images: np.ndarray = field(repr=False)
    labels: torch.Tensor = field(repr=False)  # int64 [N]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, indices: np.ndarray) -> ArrayDataset:
        """These rows, normalised: bit-identical to ``load_dataset(...).subset(indices)`` (the same elementwise
        arithmetic on the same pixels)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"row indices must be 1-D, got shape {idx.shape}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}), got range [{int(idx.min())}, {int(idx.max())}]")
        mean, std = NORMALISATION[self.name]
        x = images_to_tensor(np.ascontiguousarray(self.images[idx]), mean, std)
        y = self.labels.index_select(0, torch.from_numpy(idx))
        return ArrayDataset(x, y, self.num_classes, self.name)


def load_raw_images(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> RawImages | None:
    """The split's stored pixels and labels (fl_common/data/decoded_cache.py keeps them decoded), or None when
    ``name`` is not an idx dataset found on disk (cifar10, synthetic, a download): use :func:`load_dataset` then."""
    if name not in _IDX_SPECS:
        return None
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    found = _find_idx_pair(name, split, Path(data_dir).expanduser() if data_dir is not None else None)
    if found is None:
        return None
    images, labels = _checked_idx_pair(*found, cached=True)
    return RawImages(images, _labels_to_tensor(labels, _NUM_CLASSES[name], str(found[1])), _NUM_CLASSES[name], name)


def _idx_fixes(name: str, split: str, data_dir: Path | None, *, offer_download: bool) -> str:
    spec = _IDX_SPECS[name]
    prefix = _IDX_PREFIX[split]
    files = f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz (gzipped or not)"
    fixes = []
    if spec.install_hint and data_dir is None:
        fixes.append(spec.install_hint)
    fixes.append(f"pass --data-dir DIR holding {files} or DIR/{spec.torchvision_class}/raw/ with them")
    if offer_download:
        fixes.append("allow download")
    return ", or ".join(fixes)


def _missing_idx_message(name: str, split: str, data_dir: Path | None) -> str:
    where = data_dir if data_dir is not None else _IDX_SPECS[name].system_dir
    looked = f" in {where}" if where is not None else ""
    return f"{name} {split} split not found{looked}: {_idx_fixes(name, split, data_dir, offer_download=True)}"


def _download_idx(name: str, split: str, root: Path) -> ArrayDataset:
    import torchvision.datasets as tvd  # deferred: torchvision import costs ~1 s and is rarely needed

    cls = getattr(tvd, _IDX_SPECS[name].torchvision_class)
    try:
        ds = cls(root=str(root), train=(split == "train"), download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DatasetUnavailable(
            f"could not download {name} into {root} ({_one_line(exc)}): "
            + _idx_fixes(name, split, None, offer_download=False)
        ) from exc
    mean, std = NORMALISATION[name]
    y = _labels_to_tensor(ds.targets, _NUM_CLASSES[name], f"{name} download in {root}")
    return ArrayDataset(images_to_tensor(ds.data, mean, std), y, _NUM_CLASSES[name], name)


def _load_idx_dataset(name: str, split: str, data_dir: Path | None, download: bool) -> ArrayDataset:
    found = _find_idx_pair(name, split, data_dir)
    if found is not None:
        images_path, labels_path = found
        key = (name, split, str(images_path.parent.resolve()))
        return _cached(key, lambda: _from_idx(name, images_path, labels_path))
    if not download:
        raise DatasetUnavailable(_missing_idx_message(name, split, data_dir))
    root = data_dir if data_dir is not None else default_download_root()
    key = (name, split, f"download:{root.resolve()}")
    return _cached(key, lambda: _download_idx(name, split, root))


def _load_cifar10(split: str, data_dir: Path | None, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd  # deferred, see _download_idx

    root = data_dir if data_dir is not None else default_download_root()

    def load() -> ArrayDataset:
        try:
            ds = tvd.CIFAR10(root=str(root), train=(split == "train"), download=download)
        except (OSError, RuntimeError, ValueError) as exc:
            raise DatasetUnavailable(
                f"cifar10 {split} split not found or corrupt in {root} ({_one_line(exc)}): pass --data-dir DIR "
                "holding cifar-10-batches-py/ (the CIFAR-10 python version, extracted), or allow download"
            ) from exc
        mean, std = NORMALISATION["cifar10"]
        y = _labels_to_tensor(ds.targets, _NUM_CLASSES["cifar10"], f"cifar10 in {root}")
        return ArrayDataset(images_to_tensor(ds.data, mean, std), y, _NUM_CLASSES["cifar10"], "cifar10")

    return _cached(("cifar10", split, str(root.resolve())), load)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
) -> ArrayDataset:
    """Load one split of a dataset as normalised in-memory tensors, cached per process.

    Offline first: files already on disk are always preferred, and the network is touched only
    with ``download=True`` and nothing found. ``seed`` only affects ``synthetic``. Repeated calls
    with the same arguments return the same tensors (see :class:`ArrayDataset` on not mutating them).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if name == "synthetic":
        def load() -> ArrayDataset:
            x, y = make_synthetic(split, seed)
            return ArrayDataset(x, y, SYNTHETIC_NUM_CLASSES, "synthetic")

        return _cached(("synthetic", split, f"seed={seed}"), load)
    if name == "cifar10":
        return _load_cifar10(split, root, download)
    return _load_idx_dataset(name, split, root, download)


def warm_decoded_cache(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Decode an idx dataset's split into the decoded-data cache now (numpy only: no torch operation runs, so a
    process may still fork safely afterwards); False when ``name`` is not an idx dataset found on disk."""
    if name not in _IDX_SPECS:
        return False
    found = _find_idx_pair(name, split, Path(data_dir).expanduser() if data_dir is not None else None)
    if found is None:
        return False
    _checked_idx_pair(*found, cached=True)
    return True
