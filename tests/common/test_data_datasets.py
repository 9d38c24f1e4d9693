"""Dataset loading on real files: tiny idx / CIFAR pickles written here, plus the Debian Fashion-MNIST."""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from fl_common.data import datasets as ds_mod
from fl_common.data.datasets import (
    DATASETS,
    NORMALISATION,
    ArrayDataset,
    DatasetUnavailable,
    images_to_tensor,
    load_dataset,
)
from fl_common.data.idx import IdxFormatError, read_idx

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write ``array`` (uint8) as an idx file, the way the MNIST distributions do."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_split(directory: Path, prefix: str, n: int, *, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gz=gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return images, labels


def denormalise(x: torch.Tensor, name: str) -> np.ndarray:
    mean, std = NORMALISATION[name]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("split,prefix", [("train", "train"), ("test", "t10k")])
def test_idx_files_load_exactly(tmp_path, gz, split, prefix):
    images, labels = write_split(tmp_path, prefix, 7, gz=gz)
    ds = load_dataset("fashion_mnist", split, data_dir=tmp_path)
    assert len(ds) == 7 and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    np.testing.assert_array_equal(denormalise(ds.x, "fashion_mnist")[:, 0], images)
    np.testing.assert_array_equal(ds.y.numpy(), labels)


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_raw_layout(tmp_path, name, folder):
    images, labels = write_split(tmp_path / folder / "raw", "train", 5, gz=False)
    ds = load_dataset(name, "train", data_dir=tmp_path)
    assert ds.name == name
    # Each dataset has its own constants: decoding with them must give back the exact bytes.
    np.testing.assert_array_equal(denormalise(ds.x, name)[:, 0], images)
    np.testing.assert_array_equal(ds.y.numpy(), labels)


def test_second_load_is_cached_same_tensors(tmp_path):
    write_split(tmp_path, "train", 4, gz=True)
    first = load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    second = load_dataset("fashion_mnist", "train", data_dir=str(tmp_path))
    assert second is first and second.x is first.x


def test_corrupt_magic_is_a_clear_error(tmp_path):
    write_split(tmp_path, "train", 3, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"\x12\x34\x56\x78"
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetUnavailable, match="magic number") as info:
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    write_split(tmp_path, "train", 3, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetUnavailable, match="truncated"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    write_split(tmp_path, "train", 50, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetUnavailable, match="corrupt"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)


def test_image_label_count_mismatch_refused(tmp_path):
    write_split(tmp_path, "train", 3, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DatasetUnavailable, match=r"3 images but .* 4 labels"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)


def test_out_of_range_labels_refused(tmp_path):
    write_split(tmp_path, "train", 3, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 10, 2], np.uint8), gz=False)
    with pytest.raises(DatasetUnavailable, match="labels span"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path)


def test_read_idx_rank_check(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), gz=False)
    assert read_idx(path).shape == (5,)
    with pytest.raises(IdxFormatError, match="expected 3"):
        read_idx(path, expect_ndim=3)


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    msg = str(info.value)
    assert "--data-dir" in msg and "t10k-images-idx3-ubyte" in msg and "download" in msg and "\n" not in msg


def test_missing_system_package_names_apt(monkeypatch, tmp_path):
    absent = ds_mod._IdxSpec("FashionMNIST", tmp_path / "absent", "apt-get install dataset-fashion-mnist")
    monkeypatch.setitem(ds_mod._IDX_SPECS, "fashion_mnist", absent)
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")


class _FakeTorchvisionMNIST:
    """Stands in for torchvision's downloader (no network here); records how it was called."""

    calls: ClassVar[list[tuple[str, bool, bool]]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((root, train, download))
        rng = np.random.default_rng(1)
        self.data = torch.from_numpy(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8))
        self.targets = torch.arange(6) % 10


def test_download_goes_through_torchvision_only_when_nothing_found(monkeypatch, tmp_path):
    import torchvision.datasets

    _FakeTorchvisionMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeTorchvisionMNIST)
    ds = load_dataset("fashion_mnist", "train", data_dir=tmp_path, download=True)
    assert _FakeTorchvisionMNIST.calls == [(str(tmp_path), True, True)]
    assert ds.x.shape == (6, 1, 28, 28) and ds.y.tolist() == list(range(6))

    local = tmp_path / "local"
    write_split(local, "train", 3, gz=True)
    assert len(load_dataset("fashion_mnist", "train", data_dir=local, download=True)) == 3
    assert len(_FakeTorchvisionMNIST.calls) == 1  # files on disk win; no download attempted


def test_failed_download_is_dataset_unavailable(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetUnavailable, match=r"could not download mnist .*no route to host.*--data-dir"):
        load_dataset("mnist", "train", data_dir=tmp_path, download=True)


# ----------------------------------------------------------------------------- the real Debian copy


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.input_shape == test.input_shape == (1, 28, 28)
    assert train.num_classes == 10 and set(train.y.unique().tolist()) == set(range(10))
    assert train.x.dtype == torch.float32
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
    assert load_dataset("fashion_mnist", "train") is train


# ----------------------------------------------------------------------------- CIFAR-10


def write_fake_cifar(root: Path, per_batch: int, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-pickle layout torchvision reads: rows of 3072 bytes, R plane then G then B."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return written


def test_cifar_fake_files_are_refused_by_torchvision_md5(tmp_path):
    # torchvision's CIFAR10 md5-checks every batch file (and batches.meta) even with
    # download=False, so fake files cannot pass as the real set: we must report it clearly.
    write_fake_cifar(tmp_path, 2)
    with pytest.raises(DatasetUnavailable, match=r"cifar10 test split not found or corrupt.*--data-dir"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_missing_names_the_fix(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"cifar-10-batches-py.*allow download"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "nothing")


def test_cifar_through_torchvision_reader(monkeypatch, tmp_path):
    # Only the md5 check is bypassed: torchvision still unpickles our files and builds .data
    # (N, 32, 32, 3) and .targets itself, so this exercises the real reading + our conversion.
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    written = write_fake_cifar(tmp_path, 3)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(train) == 15 and len(test) == 3 and train.input_shape == (3, 32, 32)
    data, labels = written["test_batch"]
    np.testing.assert_array_equal(denormalise(test.x, "cifar10"), data.reshape(-1, 3, 32, 32))
    assert test.y.tolist() == labels
    expected_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    np.testing.assert_array_equal(denormalise(train.x, "cifar10"), expected_train.reshape(-1, 3, 32, 32))


def test_images_to_tensor_channels_last_and_normalisation():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = images_to_tensor(hwc, mean, std)
    assert out.shape == (4, 3, 5, 6) and out.dtype == torch.float32 and out.is_contiguous()
    for c in range(3):
        expected = (hwc[..., c].astype(np.float64) / 255 - mean[c]) / std[c]
        np.testing.assert_allclose(out[:, c].numpy(), expected, rtol=1e-5, atol=1e-5)
    gray = images_to_tensor(torch.from_numpy(hwc[..., 0]), (0.5,), (0.5,))
    assert gray.shape == (4, 1, 5, 6)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(hwc.astype(np.float32), mean, std)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shape_determinism_and_balance():
    a = load_dataset("synthetic", "train", seed=3)
    b = load_dataset("synthetic", "test", seed=3)
    assert (len(a), len(b)) == (6000, 1000) and a.input_shape == (1, 28, 28) and a.num_classes == 10
    assert torch.bincount(a.y).tolist() == [600] * 10
    ds_mod.clear_cache()
    again = load_dataset("synthetic", "train", seed=3)
    assert again is not a and torch.equal(again.x, a.x) and torch.equal(again.y, a.y)
    other = load_dataset("synthetic", "train", seed=4)
    assert not torch.equal(other.x, a.x)
    assert abs(a.x.mean().item()) < 0.05 and abs(a.x.std().item() - 1) < 0.05


def test_synthetic_is_learnable_by_logistic_regression():
    train = load_dataset("synthetic", "train", seed=0)
    test = load_dataset("synthetic", "test", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(train), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(train.x[idx].flatten(1)), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(test.x.flatten(1)).argmax(1) == test.y).float().mean().item()
    assert acc > 0.6, f"synthetic test accuracy {acc:.3f} after 200 steps"


# ----------------------------------------------------------------------------- ArrayDataset & arguments


def test_subset_copies_and_checks_bounds():
    ds = load_dataset("synthetic", "test", seed=0)
    sub = ds.subset(np.array([5, 1, 5]))
    assert len(sub) == 3 and torch.equal(sub.x[0], ds.x[5]) and sub.y.tolist() == ds.y[[5, 1, 5]].tolist()
    sub.x.zero_()
    assert ds.x[5].abs().sum() > 0  # the shared cached tensor is untouched
    assert len(ds.subset(torch.tensor([0, 2]))) == 2 and len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError, match=r"\[0, 1000\)"):
        ds.subset([1000])


def test_array_dataset_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same N"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.long), 10, "x")


def test_unknown_name_or_split():
    assert "fashion_mnist" in DATASETS
    with pytest.raises(ValueError, match="dataset 'imagenet' is unknown; choose one of fashion_mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split 'val' is unknown"):
        load_dataset("synthetic", "val")


def test_importing_data_pulls_in_no_transport_or_driver():
    code = (
        "import sys, fl_common.data; "
        "bad = [m for m in ('flask', 'requests', 'fl_server', 'fl_client') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
