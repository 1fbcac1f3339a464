"""Dataset loaders against small files written here in the standard formats.

The writers below follow the published formats byte by byte (IDX header via
struct, CIFAR dicts with bytes keys, SVHN's [32, 32, 3, N] .mat layout), and the
expected tensors are computed element by element from the raw bytes, not by
reshaping the way the loader does.
"""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from dce_kernels.experiments.data import (
    DEBIAN_FASHION_MNIST_DIR,
    DatasetFormatError,
    DatasetNotFoundError,
    dataset_info,
    load_dataset,
    make_loaders,
    read_idx,
)


@pytest.fixture
def rng():
    # Seeded from torch's per-test seed (conftest): fresh data, reproducible failures.
    return np.random.default_rng(torch.initial_seed())


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    # A developer's DCE_DATA_DIR must not change what these tests read.
    monkeypatch.delenv("DCE_DATA_DIR", raising=False)


def normalized(pixels_u8, name, channel_of):
    """(x/255 - mean[c]) / std[c] in float64, c given per element."""
    info = dataset_info(name)
    mean = np.array(info["mean"])[channel_of]
    std = np.array(info["std"])[channel_of]
    return (pixels_u8.astype(np.float64) / 255.0 - mean) / std


# -- writers -------------------------------------------------------------------

def write_idx(path: Path, type_code: int, dims, payload: bytes, compress: bool):
    blob = bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload
    path.write_bytes(gzip.compress(blob) if compress else blob)


def write_fashion(d: Path, prefix: str, n: int, rng, compress: bool):
    d.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=n * 28 * 28, dtype=np.uint8).tobytes()
    labels = rng.integers(0, 10, size=n, dtype=np.uint8).tobytes()
    ext = ".gz" if compress else ""
    write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", 0x08, (n, 28, 28), pixels, compress)
    write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", 0x08, (n,), labels, compress)
    return pixels, labels


def write_cifar_batch(path: Path, data: np.ndarray, labels, label_key: bytes, protocol=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": data, label_key: list(labels),
             b"filenames": [b"x.png"] * len(data)}
    if protocol == "numpy1":
        # As the published batches were written: protocol 2, numpy 1.x module path.
        blob = pickle.dumps(batch, protocol=2)
        path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    else:
        path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_svhn(path: Path, n: int, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1), dtype=np.uint8)  # 10 stands for digit 0
    y[0, 0] = 10
    scipy.io.savemat(path, {"X": x, "y": y}, format="5")
    return x, y


# -- Fashion-MNIST ---------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_fashion_mnist_pixels_and_labels(tmp_path, rng, compress, train):
    n = 7
    prefix = "train" if train else "t10k"
    pixels, labels = write_fashion(tmp_path, prefix, n, rng, compress)
    ds = load_dataset("fashion-mnist", tmp_path, train=train)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (n, 1, 28, 28)
    i, c, h, w = np.indices(x.shape)
    raw = np.frombuffer(pixels, np.uint8)[i * 784 + h * 28 + w]
    np.testing.assert_allclose(x.numpy(), normalized(raw, "fashion-mnist", c), rtol=1e-5,
                               atol=1e-5)
    assert y.tolist() == list(labels)


def test_fashion_mnist_found_in_subdir_and_via_env(tmp_path, rng, monkeypatch):
    _, labels = write_fashion(tmp_path / "fashion-mnist", "t10k", 3, rng, True)
    assert load_dataset("fashion-mnist", tmp_path, train=False).tensors[1].tolist() == list(labels)
    monkeypatch.setenv("DCE_DATA_DIR", str(tmp_path))
    assert load_dataset("fashion-mnist", train=False).tensors[1].tolist() == list(labels)


def test_read_idx_wider_types(tmp_path, rng):
    values = rng.standard_normal((3, 4)).astype(">f4")
    write_idx(tmp_path / "f.idx", 0x0D, values.shape, values.tobytes(), compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), values)


def test_fashion_mnist_missing_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", tmp_path / "nowhere", train=True)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_labels_alone_are_not_enough(tmp_path, rng):
    write_fashion(tmp_path, "t10k", 2, rng, True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path, train=False)


def _corrupt_idx(tmp_path, rng, how):
    write_fashion(tmp_path, "t10k", 4, rng, compress=(how == "bad-gzip"))
    ext = ".gz" if how == "bad-gzip" else ""
    img = tmp_path / f"t10k-images-idx3-ubyte{ext}"
    blob = img.read_bytes()
    if how == "magic":
        img.write_bytes(b"\x00\x00\x07\x03" + blob[4:])  # 0x07 is no IDX type code
    elif how == "truncated":
        img.write_bytes(blob[:-5])
    elif how == "bad-gzip":
        img.write_bytes(blob[: len(blob) // 2])
    elif how == "count":
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x08, (3,), bytes(3), compress=False)
    elif how == "shape":
        write_idx(img, 0x08, (4, 27, 28), bytes(4 * 27 * 28), compress=False)
    return "t10k-labels-idx1-ubyte" if how == "count" else img.name


@pytest.mark.parametrize("how", ["magic", "truncated", "bad-gzip", "count", "shape"])
def test_fashion_mnist_corrupt_file_is_named(tmp_path, rng, how):
    bad_name = _corrupt_idx(tmp_path, rng, how)
    with pytest.raises(DatasetFormatError, match=bad_name):
        load_dataset("fashion-mnist", tmp_path, train=False)


def test_fashion_mnist_label_out_of_range(tmp_path, rng):
    write_fashion(tmp_path, "t10k", 2, rng, False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x08, (2,), bytes([3, 10]), compress=False)
    with pytest.raises(DatasetFormatError, match=r"t10k-labels-idx1-ubyte.*\[0, 10\)"):
        load_dataset("fashion-mnist", tmp_path, train=False)


# The real data, where Debian's package put it (this machine may lack it).
_REAL = [DEBIAN_FASHION_MNIST_DIR / f"{s}-idx{k}-ubyte.gz"
         for s, k in (("t10k-images", 3), ("t10k-labels", 1), ("train-images", 3),
                      ("train-labels", 1))]
needs_real_fashion = pytest.mark.skipif(
    not all(p.is_file() for p in _REAL),
    reason=f"Fashion-MNIST IDX files absent from {DEBIAN_FASHION_MNIST_DIR} "
           "(apt-get install dataset-fashion-mnist)")


@needs_real_fashion
def test_real_fashion_mnist_test_split():
    x, y = load_dataset("fashion-mnist", train=False).tensors  # default location
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10
    assert torch.isfinite(x).all()


@needs_real_fashion
def test_real_fashion_mnist_train_stats_match_dataset_info():
    # The mean/std constants are right iff normalized training pixels have mean 0, std 1.
    x, y = load_dataset("fashion-mnist", train=True).tensors
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10
    assert abs(x.double().mean().item()) < 2e-3
    assert abs(x.double().std().item() - 1) < 2e-3


# -- CIFAR -------------------------------------------------------------------------

def _cifar_expected(data: np.ndarray, name: str) -> np.ndarray:
    # Each row: 1024 red, 1024 green, 1024 blue values, each 32x32 plane row-major.
    i, c, h, w = np.indices((len(data), 3, 32, 32))
    return normalized(data[i, c * 1024 + h * 32 + w], name, c)


def test_cifar10_train_concatenates_batches_in_order(tmp_path, rng):
    d = tmp_path / "cifar-10-batches-py"
    datas, labels = [], []
    for k in range(1, 6):
        data = rng.integers(0, 256, size=(2 + k % 2, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, size=len(data)).tolist()
        write_cifar_batch(d / f"data_batch_{k}", data, lab, b"labels")
        datas.append(data)
        labels += lab
    x, y = load_dataset("cifar10", tmp_path, train=True).tensors
    data = np.concatenate(datas)
    assert x.shape == (len(data), 3, 32, 32)
    np.testing.assert_allclose(x.numpy(), _cifar_expected(data, "cifar10"), rtol=1e-5, atol=1e-5)
    assert y.tolist() == labels

    x3, y3 = load_dataset("cifar10", tmp_path, train=True, limit=4).tensors
    torch.testing.assert_close(x3, x[:4])
    assert y3.tolist() == labels[:4]


@pytest.mark.parametrize("protocol", ["numpy1", 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name,subdir,file,key", [
    ("cifar10", "cifar-10-batches-py", "test_batch", b"labels"),
    ("cifar100", "cifar-100-python", "test", b"fine_labels"),
    ("cifar100", "cifar-100-python", "train", b"fine_labels"),
])
def test_cifar_single_file_splits(tmp_path, rng, name, subdir, file, key, protocol):
    classes = dataset_info(name)["num_classes"]
    data = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, size=5).tolist()
    labels[0] = classes - 1
    write_cifar_batch(tmp_path / subdir / file, data, labels, key, protocol)
    x, y = load_dataset(name, tmp_path, train=(file != "test" and file != "test_batch")).tensors
    np.testing.assert_allclose(x.numpy(), _cifar_expected(data, name), rtol=1e-5, atol=1e-5)
    assert y.tolist() == labels


def test_cifar100_uses_fine_labels(tmp_path, rng):
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    path = tmp_path / "cifar-100-python" / "test"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [99, 50, 0], b"coarse_labels": [19, 1, 2]},
                    f, protocol=2)
    assert load_dataset("cifar100", tmp_path, train=False).tensors[1].tolist() == [99, 50, 0]


def test_cifar_missing_batch_is_named(tmp_path, rng):
    d = tmp_path / "cifar-10-batches-py"
    for k in (1, 2, 4, 5):
        write_cifar_batch(d / f"data_batch_{k}", np.zeros((1, 3072), np.uint8), [0], b"labels")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as err:
        load_dataset("cifar10", tmp_path, train=True)
    assert "cifar-10-python.tar.gz" in str(err.value) and str(d) in str(err.value)


def test_cifar_without_any_directory_says_how_to_give_one(monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="DCE_DATA_DIR"):
        load_dataset("cifar100", train=False)


@pytest.mark.parametrize("how", ["not-pickle", "truncated", "no-labels", "row-size", "count",
                                 "label-range"])
def test_cifar_corrupt_batch_is_named(tmp_path, rng, how):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    labels = [1, 2, 3, 4]
    if how == "row-size":
        data = data[:, :3000]
    if how == "count":
        labels = labels[:3]
    if how == "label-range":
        labels[2] = 10
    write_cifar_batch(path, data, labels, b"no_labels" if how == "no-labels" else b"labels")
    if how == "not-pickle":
        path.write_bytes(b"this is not a pickle")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetFormatError, match="test_batch"):
        load_dataset("cifar10", tmp_path, train=False)


def test_cifar_bad_label_in_a_later_batch_names_that_batch(tmp_path, rng):
    d = tmp_path / "cifar-10-batches-py"
    bad = int(rng.integers(2, 6))  # not the first: that one a wrong name would say too
    for k in range(1, 6):
        labels = rng.integers(0, 10, size=3).tolist()
        if k == bad:
            labels[int(rng.integers(0, 3))] = int(rng.choice([-1, 10, 255]))
        write_cifar_batch(d / f"data_batch_{k}", rng.integers(0, 256, (3, 3072), np.uint8),
                          labels, b"labels")
    with pytest.raises(DatasetFormatError, match=rf"data_batch_{bad}: labels must be in"):
        load_dataset("cifar10", tmp_path, train=True)


@pytest.mark.parametrize("how, message", [
    ("empty-file", "not a CIFAR python batch"),
    ("a-list", "expected a pickled dict, got list"),
    ("float-pixels", "must be uint8"),
    ("float-labels", "must be a list of integers"),
    ("string-labels", "must be a list of integers"),
    ("no-images", "holds no images"),
    ("cifar100-file", "missing key b'labels'"),
])
def test_cifar_wrong_format_batch_is_named(tmp_path, rng, how, message):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    labels, key = [1, 2, 3], b"labels"
    if how == "float-pixels":
        data = data.astype(np.float32)
    elif how == "float-labels":
        labels = [1.0, 2.5, 3.0]
    elif how == "string-labels":
        labels = ["cat", "dog", "ship"]
    elif how == "no-images":
        data, labels = data[:0], []
    elif how == "cifar100-file":
        key = b"fine_labels"
    write_cifar_batch(path, data, labels, key)
    if how == "empty-file":
        path.write_bytes(b"")
    elif how == "a-list":
        path.write_bytes(pickle.dumps([data, labels], protocol=2))
    with pytest.raises(DatasetFormatError, match=rf"test_batch.*{message}"):
        load_dataset("cifar10", tmp_path, train=False)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os
        return (os.mkdir, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    marker = tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match="test_batch"):
        load_dataset("cifar10", tmp_path, train=False)
    assert not marker.exists()


# -- SVHN ----------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_svhn_layout_and_label_10_is_digit_0(tmp_path, rng, train):
    fname = "train_32x32.mat" if train else "test_32x32.mat"
    X, Y = write_svhn(tmp_path / fname, 6, rng)
    x, y = load_dataset("svhn", tmp_path, train=train).tensors
    assert x.shape == (6, 3, 32, 32)
    i, c, h, w = np.indices(x.shape)
    np.testing.assert_allclose(x.numpy(), normalized(X[h, w, c, i], "svhn", c), rtol=1e-5,
                               atol=1e-5)
    expected = [0 if v == 10 else int(v) for v in Y[:, 0]]
    assert y.tolist() == expected and y[0] == 0


def test_svhn_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path, train=False)


@pytest.mark.parametrize("how", ["not-mat", "truncated", "layout", "count", "no-y"])
def test_svhn_corrupt_file_is_named(tmp_path, rng, how):
    path = tmp_path / "svhn" / "test_32x32.mat"
    write_svhn(path, 4, rng)
    if how == "not-mat":
        path.write_bytes(b"garbage" * 100)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "layout":  # channels-first by mistake: [3, 32, 32, N]
        scipy.io.savemat(path, {"X": np.zeros((3, 32, 32, 4), np.uint8),
                                "y": np.ones((4, 1), np.uint8)})
    elif how == "count":
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8),
                                "y": np.ones((5, 1), np.uint8)})
    elif how == "no-y":
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(DatasetFormatError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path, train=False)


@pytest.mark.parametrize("how, message", [
    ("label-zero", r"labels must be 1..10 \(10 is digit 0\), got \[0, "),
    ("label-eleven", r"labels must be 1..10"),
    ("fractional-labels", "whole numbers"),
    ("float-images", "X must be uint8"),
    ("no-images", "holds no images"),
])
def test_svhn_wrong_contents_are_named(tmp_path, rng, how, message):
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.parent.mkdir()
    n = 4
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    if how == "label-zero":
        y[int(rng.integers(0, n))] = 0
    elif how == "label-eleven":
        y[int(rng.integers(0, n))] = 11
    elif how == "fractional-labels":
        y = y.astype(np.float64)
        y[int(rng.integers(0, n))] += 0.5
    elif how == "float-images":
        X = X.astype(np.float64)
    elif how == "no-images":
        X, y = X[..., :0], y[:0]
    scipy.io.savemat(path, {"X": X, "y": y})
    with pytest.raises(DatasetFormatError, match=rf"test_32x32.mat.*{message}"):
        load_dataset("svhn", tmp_path, train=False)


def test_svhn_whole_float_labels_are_read(tmp_path, rng):
    # MATLAB writes doubles by default: labels 1.0 .. 10.0 are fine.
    path = tmp_path / "test_32x32.mat"
    y = rng.integers(1, 11, size=(5, 1))
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8),
                            "y": y.astype(np.float64)})
    got = load_dataset("svhn", tmp_path, train=False).tensors[1]
    assert got.dtype == torch.int64 and got.tolist() == [v % 10 for v in y[:, 0].tolist()]


def test_fashion_mnist_without_images_is_named(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 0x08, (0, 28, 28), b"", compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x08, (0,), b"", compress=False)
    with pytest.raises(DatasetFormatError, match="t10k-images-idx3-ubyte holds no images"):
        load_dataset("fashion-mnist", tmp_path, train=False)


def test_bad_data_stops_a_run_before_it_trains(tmp_path, rng):
    from dce_kernels.experiments.train import train
    from toolkit import tiny_config

    write_fashion(tmp_path / "data", "train", 4, rng, False)
    write_fashion(tmp_path / "data", "t10k", 3, rng, False)
    write_idx(tmp_path / "data" / "t10k-labels-idx1-ubyte", 0x08, (3,), bytes([1, 12, 0]),
              compress=False)
    run_dir = tmp_path / "run"
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte"):
        train(tiny_config(dataset="fashion-mnist", data_dir=str(tmp_path / "data"),
                          run_dir=str(run_dir)))
    assert not run_dir.exists()


# -- API -------------------------------------------------------------------------------

def test_dataset_info_and_unknown_name():
    info = dataset_info("cifar100")
    assert (info["in_channels"], info["num_classes"], info["image_size"]) == (3, 100, 32)
    assert len(info["mean"]) == len(info["std"]) == 3
    assert dataset_info("fashion-mnist")["in_channels"] == 1
    with pytest.raises(ValueError, match="imagenet"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("svhn", "/nonexistent", limit=0)


def test_make_loaders_is_reproducible_and_limited(tmp_path, rng):
    write_fashion(tmp_path, "train", 20, rng, True)
    write_fashion(tmp_path, "t10k", 9, rng, True)
    first12 = load_dataset("fashion-mnist", tmp_path, train=True, limit=12).tensors[0]
    first5 = load_dataset("fashion-mnist", tmp_path, train=False, limit=5).tensors[0]

    def images(loader):
        return torch.cat([x for x, _ in loader])

    train, test = make_loaders("fashion-mnist", tmp_path, batch_size=4, limit_train=12,
                               limit_test=5, seed=3)
    epoch1, epoch2 = images(train), images(train)
    again = images(make_loaders("fashion-mnist", tmp_path, 4, 12, 5, seed=3)[0])
    other = images(make_loaders("fashion-mnist", tmp_path, 4, 12, 5, seed=4)[0])
    torch.testing.assert_close(images(test), first5)  # test split: unshuffled
    assert torch.equal(epoch1, again)  # same seed, same order
    # Shuffled: the same 12 images, in an order that changes per epoch and per seed
    # (random images, so equal orders would mean no shuffling at all).
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert key(epoch1) == key(first12)
    assert not torch.equal(epoch1, first12)
    assert not torch.equal(epoch1, epoch2)
    assert not torch.equal(epoch1, other)
