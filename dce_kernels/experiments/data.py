"""Image-classification datasets from their standard on-disk formats.

Everything is read from local files (nothing is downloaded): Fashion-MNIST from
its IDX files (Debian's ``dataset-fashion-mnist`` ships them), CIFAR-10/100
from the "python version" pickle batches, SVHN from the cropped-digit ``.mat``
files. Images come back as float32 ``[N, C, H, W]`` normalized with the
dataset's per-channel mean/std, labels as int64.

Where files are looked for: ``data_dir`` if given, else the environment
variable ``DCE_DATA_DIR``, else the dataset's system location (only
Fashion-MNIST has one). Inside that root, the dataset's usual sub-folder is
tried first, then the root itself.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "dataset_info",
    "load_dataset",
    "make_loaders",
    "read_idx",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DCE_DATA_DIR"

PathLike = Union[str, os.PathLike]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format."""


# Mean/std are per channel over the training split, pixels scaled to [0, 1].
_INFO = {
    "fashion-mnist": dict(in_channels=1, num_classes=10, image_size=28,
                          mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(in_channels=3, num_classes=10, image_size=32,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(in_channels=3, num_classes=100, image_size=32,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn": dict(in_channels=3, num_classes=10, image_size=32,
                 mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
}
DATASETS = tuple(_INFO)


def _check_name(name: str) -> str:
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return name


def dataset_info(name: str) -> dict:
    """``in_channels``, ``num_classes``, ``image_size``, ``mean``, ``std`` of a dataset."""
    return dict(_INFO[_check_name(name)])


# -- where the files are -------------------------------------------------------

def _root(data_dir: Optional[PathLike], default: Optional[Path]) -> Optional[Path]:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return default


def _find_dir(root: Optional[Path], subdir: str, required: list[list[str]]) -> Optional[Path]:
    """The first of root/subdir, root holding every required file; each entry of
    ``required`` lists acceptable names for one file (e.g. with and without .gz)."""
    if root is None:
        return None
    for d in (root / subdir, root):
        if all(any((d / n).is_file() for n in names) for names in required):
            return d
    return None


def _not_found(what: str, root: Optional[Path], subdir: str, files: list[str], how: str):
    where = (f"in {root / subdir} or {root}" if root is not None else
             f"(no directory given: pass data_dir (--data-dir) or set {ENV_VAR})")
    return DatasetNotFoundError(
        f"{what} not found {where}. Needed files: {', '.join(files)}. {how}")


# -- Fashion-MNIST (IDX) --------------------------------------------------------

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or plain; detected from its content).

    Raises DatasetFormatError naming the file for a bad magic number, a bad
    gzip stream, or a payload whose size does not match the header's dims."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetFormatError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated or has 0 dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says dims {dims} ({expected} bytes of data), "
            f"file has {len(raw) - header} bytes (truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_file(d: Path, stem: str) -> Path:
    gz = d / f"{stem}.gz"
    return gz if gz.is_file() else d / stem


def _load_fashion_mnist(data_dir, train):
    prefix = "train" if train else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    root = _root(data_dir, DEBIAN_FASHION_MNIST_DIR)
    d = _find_dir(root, "fashion-mnist", [[s + ".gz", s] for s in stems])
    if d is None:
        raise _not_found(
            "Fashion-MNIST", root, "fashion-mnist", [s + "(.gz)" for s in stems],
            "On Debian: `apt-get install dataset-fashion-mnist` installs them in "
            f"{DEBIAN_FASHION_MNIST_DIR}.")
    img_path, lbl_path = _idx_file(d, stems[0]), _idx_file(d, stems[1])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DatasetFormatError(
            f"{img_path}: expected uint8 images of shape [N, 28, 28], got "
            f"{images.dtype} {list(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetFormatError(
            f"{lbl_path}: expected 1-D uint8 labels, got {labels.dtype} {list(labels.shape)}")
    _check_counts(images, labels, img_path, lbl_path)
    return images[:, None], labels, lbl_path


# -- CIFAR (python pickles) ------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, bytes, numpy
    arrays): a pickle can run arbitrary code, and data files come from anywhere."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # Protocol 5 (Python 3 default) stores arrays through _frombuffer.
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
        # ... and an empty array's buffer as bytes() (the builtin, under its Python 2 name).
        ("__builtin__", "bytes"), ("builtins", "bytes"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path, label_key: str,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the batches were pickled by Python 2 (keys are bytes).
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle raises almost anything; only ours allowed
        raise DatasetFormatError(f"{path}: not a CIFAR python batch "
                                 f"({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetFormatError(
                f"{path}: missing key b'{key}' (has {sorted(map(str, batch))})")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    labels = np.asarray(batch[label_key])
    # An empty list comes back as float64: its emptiness is the error to report.
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DatasetFormatError(f"{path}: b'{label_key}' must be a list of integers")
    _check_counts(data, labels, path, path)
    # Checked per file: the batch that holds a bad label is the one to name.
    _check_labels(labels, num_classes, path)
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name, data_dir, train, limit):
    if name == "cifar10":
        what, subdir, label_key = "CIFAR-10", "cifar-10-batches-py", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        archive = "cifar-10-python.tar.gz"
    else:
        what, subdir, label_key = "CIFAR-100", "cifar-100-python", "fine_labels"
        files = ["train" if train else "test"]
        archive = "cifar-100-python.tar.gz"
    root = _root(data_dir, None)
    d = _find_dir(root, subdir, [[f] for f in files])
    if d is None:
        raise _not_found(what, root, subdir, files,
                         f"Extract the 'python version' archive {archive} into the data "
                         f"directory (it creates {subdir}/).")
    images, labels = [], []
    for f in files:
        x, y = _read_cifar_batch(d / f, label_key, _INFO[name]["num_classes"])
        images.append(x)
        labels.append(y)
        # The batches are in order, so a limit can stop reading early.
        if limit is not None and sum(len(a) for a in labels) >= limit:
            break
    return np.concatenate(images), np.concatenate(labels), d / files[0]


# -- SVHN (MATLAB v5) --------------------------------------------------------------

def _load_svhn(data_dir, train):
    import scipy.io  # only SVHN needs it; keeps `import dce_kernels.experiments.data` light

    fname = "train_32x32.mat" if train else "test_32x32.mat"
    root = _root(data_dir, None)
    d = _find_dir(root, "svhn", [[fname]])
    if d is None:
        raise _not_found("SVHN", root, "svhn", [fname],
                         "Use the 'cropped digits' (format 2) .mat files of SVHN.")
    path = d / fname
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as e:  # scipy's answer to v7.3 (HDF5) files
        raise DatasetFormatError(f"{path}: MATLAB v7.3 files are not supported ({e})") from e
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ... here
        raise DatasetFormatError(f"{path}: not a readable MATLAB v5 file ({e})") from e
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables X and y, found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.ndim != 4:
        raise DatasetFormatError(
            f"{path}: X must be uint8 [32, 32, 3, N], got {x.dtype} {list(x.shape)}")
    if y.ndim != 2 or y.shape[1] != 1:
        raise DatasetFormatError(f"{path}: y must be [N, 1], got {list(y.shape)}")
    y = y[:, 0]
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise DatasetFormatError(f"{path}: SVHN labels must be whole numbers, got {y.dtype} "
                                 "values with a fractional part")
    if not np.all((y >= 1) & (y <= 10)):
        raise DatasetFormatError(f"{path}: SVHN labels must be 1..10 (10 is digit 0), got "
                                 f"[{y.min()}, {y.max()}]")
    y = y.astype(np.int64)
    images = x.transpose(3, 2, 0, 1)  # [H, W, C, N] -> [N, C, H, W]
    _check_counts(images, y, path, path)
    return images, np.where(y == 10, 0, y), path


# -- shared ------------------------------------------------------------------------

def _check_counts(images, labels, img_path, lbl_path):
    if len(images) != len(labels):
        raise DatasetFormatError(
            f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(images) == 0:
        # Caught here, not as a division by zero in the first epoch.
        raise DatasetFormatError(f"{img_path} holds no images")


def _check_labels(labels, num_classes, path):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{path}: labels must be in [0, {num_classes}), "
            f"got [{labels.min()}, {labels.max()}]")


def load_dataset(name: str, data_dir: Optional[PathLike] = None, train: bool = True,
                 limit: Optional[int] = None) -> TensorDataset:
    """The train or test split of ``name`` as a TensorDataset of (float32
    normalized images ``[N, C, H, W]``, int64 labels). ``limit`` keeps the first
    ``limit`` samples (files are in a fixed order, so this is deterministic)."""
    name = _check_name(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    if name == "fashion-mnist":
        images, labels, label_file = _load_fashion_mnist(data_dir, train)
    elif name in ("cifar10", "cifar100"):
        images, labels, label_file = _load_cifar(name, data_dir, train, limit)
    else:
        images, labels, label_file = _load_svhn(data_dir, train)
    info = _INFO[name]
    _check_labels(labels, info["num_classes"], label_file)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # A fresh float32 array: the IDX arrays are read-only views of the file's bytes.
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255)
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def make_loaders(name: str, data_dir: Optional[PathLike], batch_size: int,
                 limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                 seed: int = 0, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders. The train loader reshuffles every epoch from
    its own generator seeded with ``seed``, so a run's batch order is reproducible
    and independent of other users of the global RNG."""
    train = load_dataset(name, data_dir, train=True, limit=limit_train)
    test = load_dataset(name, data_dir, train=False, limit=limit_test)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=num_workers)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False,
                             num_workers=num_workers)
    return train_loader, test_loader
