"""Small, offline classification datasets for the asrfx demo and tests.

:func:`load_dataset` returns a :class:`Split` (train and test tensors plus their shape facts) for
one of these specs; nothing is ever downloaded:

* ``"digits"`` -- scikit-learn's bundled copy of the UCI handwritten digits
  (:func:`sklearn.datasets.load_digits`: 1,797 real 8x8 grey images, 10 classes), split 70/30
  with ``train_test_split(test_size=0.3, random_state=0, stratify=y)``.
* ``"mnist1d"`` -- the MNIST-1D benchmark (Greydanus, "Scaling down Deep Learning", 2020,
  arXiv:2011.14439), generated locally by ``mnist1d.data.make_dataset(get_dataset_args())``:
  4,000 train and 1,000 test signals of 40 samples, 10 classes.
* ``"cifar10:DIR"`` / ``"cifar100:DIR"`` -- CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) read from the
  *binary version* files a user already has in ``DIR`` (either directly or in the archive's
  ``cifar-10-batches-bin`` / ``cifar-100-binary`` subfolder). The files are parsed from raw bytes
  with :func:`numpy.frombuffer`; the python (pickle) version is never read, so loading a dataset
  cannot run code.
* the user's own data (:mod:`asrfx.userdata`): a ``.npz`` file, a folder of class folders of
  images, or ``module:function`` returning ``(inputs, labels)`` batches.

Every dataset is normalised per channel with its *train* set's mean and standard deviation, and
the test set gets the same affine map. :func:`batches` iterates over tensors in mini-batches.

scikit-learn and mnist1d are optional dependencies, imported only when their dataset is asked for.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import InputError
from .userdata import USER_FORMS, is_user_data, load_user_data

__all__ = ["Split", "load_dataset", "batches", "SPECS"]

#: The dataset specs :func:`load_dataset` accepts (``DIR`` is a directory path).
SPECS = ("digits", "mnist1d", "cifar10:DIR", "cifar100:DIR")

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_PIXELS = 3 * 32 * 32


@dataclass
class Split:
    """A train/test split of a classification dataset, as tensors.

    Attributes:
        name: the dataset's name (``"digits"``, ``"mnist1d"``, ``"cifar10"``, ``"cifar100"``).
        x_train: float32 inputs, shape ``(N_train, in_channels, *spatial)``, normalised.
        y_train: int64 class labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_test: float32 inputs, shape ``(N_test, in_channels, *spatial)``, normalised with the
            train statistics.
        y_test: int64 class labels, shape ``(N_test,)``.
        num_classes: number of classes.
        in_channels: number of input channels (1 for digits / mnist1d, 3 for CIFAR).
        dims: number of spatial dimensions: 1 for signals, 2 for images.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    in_channels: int
    dims: int

    @property
    def input_shape(self) -> tuple:
        """The shape of one input, without the batch dimension, e.g. ``(1, 8, 8)``.

        Returns:
            ``tuple(x_train.shape[1:])``.
        """
        return tuple(self.x_train.shape[1:])


# ----------------------------------------------------------------------------------------------
# public entry points


def load_dataset(spec: str, *, seed: int = 0) -> Split:
    """Load a dataset by spec, normalised per channel with its train statistics.

    The built-in splits are fixed: digits uses ``train_test_split(test_size=0.3,
    random_state=0, stratify=y)``, MNIST-1D uses the benchmark's own generator seed (42) and
    split, and CIFAR uses the files' train/test division; ``seed`` only draws the split of
    user data that has none of its own. Nothing is downloaded.

    Args:
        spec: ``"digits"``, ``"mnist1d"``, ``"cifar10:DIR"`` or ``"cifar100:DIR"``, where
            ``DIR`` holds the CIFAR binary-version files (directly or in the archive's
            ``cifar-10-batches-bin`` / ``cifar-100-binary`` subfolder; ``~`` is expanded);
            or the user's own data (:mod:`asrfx.userdata`): a ``.npz`` file with ``x`` and
            ``y``, a folder of class folders of images, or ``module:function`` returning
            ``(inputs, labels)`` batches.
        seed: the seed of the train/test split of user data without a split of its own.

    Returns:
        A :class:`Split` with float32 inputs and int64 labels.

    Raises:
        InputError: unknown spec, missing or unreadable CIFAR directory or files, a file that is
            not in the CIFAR binary layout, or scikit-learn / mnist1d not installed.
    """
    if not isinstance(spec, str):
        raise InputError(f"load_dataset expects a dataset spec string, got {type(spec).__name__}; "
                         f"accepted specs: {', '.join(SPECS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"load_dataset: seed must be an int, got {seed!r}")
    name, sep, arg = spec.partition(":")
    name = name.strip().lower()
    if name in ("digits", "mnist1d"):
        if sep:
            raise InputError(f"dataset spec {spec!r}: '{name}' takes no argument; use '{name}'")
        return _load_digits() if name == "digits" else _load_mnist1d()
    if name in ("cifar10", "cifar100"):
        if not arg.strip():
            raise InputError(f"dataset spec {spec!r}: {name} needs the directory of the CIFAR "
                             f"binary version, e.g. '{name}:~/data'")
        return _load_cifar(name, arg.strip(), spec)
    if is_user_data(spec):
        user, x_train, y_train, x_test, y_test, classes = load_user_data(spec, seed=seed)
        return _normalise(user, x_train, y_train, x_test, y_test, classes, x_train.dim() - 2)
    raise InputError(f"unknown dataset spec {spec!r}: give one of {', '.join(SPECS)} (DIR holds "
                     f"the CIFAR binary version) or your own data: {', '.join(USER_FORMS)}")


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None) -> Iterator[tuple]:
    """Iterate over ``(x, y)`` in mini-batches, covering every sample exactly once.

    The last batch is smaller when ``len(x)`` is not a multiple of ``batch_size``. Arguments
    are checked when ``batches`` is called, not when iteration starts.

    Args:
        x: inputs, batch dimension first.
        y: targets with the same length as ``x``.
        batch_size: samples per batch (positive int).
        shuffle: visit the samples in the order of ``torch.randperm(len(x), generator=generator)``
            instead of in order.
        generator: the random generator for shuffling (a seeded one makes the order
            reproducible); ignored when ``shuffle`` is false.

    Returns:
        An iterator of ``(xb, yb)`` tuples.

    Raises:
        InputError: ``batch_size`` not a positive int, or ``x`` and ``y`` of different lengths.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batches: batch_size must be a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise InputError(f"batches: x has {len(x)} samples but y has {len(y)}; pass matching "
                         f"tensors (e.g. split.x_train with split.y_train)")
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else None

    def _iterate():
        for start in range(0, n, batch_size):
            if order is None:
                yield x[start:start + batch_size], y[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                yield x[idx.to(x.device)], y[idx.to(y.device)]

    return _iterate()


# ----------------------------------------------------------------------------------------------
# normalisation


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple:
    """Per-channel mean and population std of ``x`` (N, C, ...), accumulated in float64."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].transpose(0, 1).reshape(c, -1).double()
        total += part.sum(1)
        count += part.shape[1]
    mean = total / count
    sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].transpose(0, 1).reshape(c, -1).double()
        sq += ((part - mean[:, None]) ** 2).sum(1)
    std = (sq / count).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant channel: only centre it
    return mean, std


def _normalise(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
               y_test: torch.Tensor, num_classes: int, dims: int) -> Split:
    """Normalise both sets in place with the train set's per-channel statistics."""
    mean, std = _channel_stats(x_train)
    shape = (1, -1) + (1,) * dims
    m, s = mean.float().view(shape), std.float().view(shape)
    x_train.sub_(m).div_(s)
    x_test.sub_(m).div_(s)
    return Split(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 num_classes=num_classes, in_channels=x_train.shape[1], dims=dims)


# ----------------------------------------------------------------------------------------------
# digits / mnist1d


def _load_digits() -> Split:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise InputError(f"dataset 'digits' needs scikit-learn, which could not be imported "
                         f"({e}); install it with `pip install scikit-learn` "
                         f"(or `pip install asrfx[demo]`)") from None
    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0  # values 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return _normalise("digits", torch.tensor(x_tr), torch.tensor(y_tr), torch.tensor(x_te),
                      torch.tensor(y_te), num_classes=10, dims=2)


def _import_mnist1d():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise InputError(f"dataset 'mnist1d' needs the mnist1d package, which could not be "
                         f"imported ({e}); install it with `pip install mnist1d` "
                         f"(or `pip install asrfx[demo]`)") from None
    return make_dataset, get_dataset_args


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple:
    """Generate MNIST-1D once per process (~2-4 s); the arrays are made read-only."""
    make_dataset, get_dataset_args = _import_mnist1d()
    # make_dataset reseeds the global `random` and numpy generators; put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64),
              np.asarray(d["x_test"], dtype=np.float32), np.asarray(d["y_test"], dtype=np.int64))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _load_mnist1d() -> Split:
    _import_mnist1d()  # a clear error even when the arrays are already cached
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays()
    return _normalise("mnist1d", torch.tensor(x_tr)[:, None], torch.tensor(y_tr),
                      torch.tensor(x_te)[:, None], torch.tensor(y_te), num_classes=10, dims=1)


# ----------------------------------------------------------------------------------------------
# CIFAR binary version


_CIFAR = {
    # name: (subfolder, train files, test files, label bytes per record, classes, title)
    "cifar10": ("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                ("test_batch.bin",), 1, 10, "CIFAR-10"),
    "cifar100": ("cifar-100-binary", ("train.bin",), ("test.bin",), 2, 100, "CIFAR-100"),
}
_ARCHIVES = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
_PICKLE_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _find_cifar_dir(name: str, directory: str, spec: str) -> Path:
    sub, train, test, _, _, title = _CIFAR[name]
    root = Path(directory).expanduser()
    get = (f"download the CIFAR binary version of {title} ({_ARCHIVES[name]}, from {_CIFAR_URL}) "
           f"and extract it into {root}")
    if not root.exists():
        raise InputError(f"dataset spec {spec!r}: directory {root} does not exist; {get}")
    if not root.is_dir():
        raise InputError(f"dataset spec {spec!r}: {root} is not a directory; DIR must be the "
                         f"folder holding the extracted {title} binary version files ({get})")
    needed = train + test
    candidates = [root, root / sub]
    for cand in candidates:
        if all((cand / f).is_file() for f in needed):
            return cand
    # report the missing files of the most complete candidate
    best = max(candidates, key=lambda c: sum((c / f).is_file() for f in needed))
    missing = [f for f in needed if not (best / f).is_file()]
    hint = ""
    if any((c / _PICKLE_FOLDERS[name]).exists() for c in (root, root.parent)) or \
            root.name == _PICKLE_FOLDERS[name]:
        hint = (f" {root} looks like the python (pickle) version, which asrfx does not read "
                f"(unpickling can run code);")
    raise InputError(f"dataset spec {spec!r}: missing {title} file(s) {', '.join(missing)} in "
                     f"{best} (looked in {root} and {root / sub}).{hint} To fix: {get}")


def _read_records(path: Path, label_bytes: int, num_classes: int, title: str) -> tuple:
    """Parse one CIFAR binary file into (uint8 pixels (N, 3, 32, 32), int64 labels (N,))."""
    record = label_bytes + _CIFAR_PIXELS
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"could not read {title} file {path}: {e}") from None
    if len(raw) == 0 or len(raw) % record:
        raise InputError(f"{path} has {len(raw)} bytes, which is not a positive multiple of the "
                         f"{title} binary record size ({record} bytes = {label_bytes} label "
                         f"byte(s) + 3072 pixel bytes); the file is truncated or not the {title} "
                         f"binary version. Re-extract it from the binary archive at {_CIFAR_URL}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label (2nd byte)
    bad = np.flatnonzero(labels >= num_classes)
    if label_bytes == 2:
        bad = np.union1d(bad, np.flatnonzero(rows[:, 0] >= 20))  # coarse label
    if bad.size:
        raise InputError(f"{path}: record {int(bad[0])} has a label outside the {title} classes; "
                         f"the file is not the {title} binary version (a CIFAR-10 file given as "
                         f"CIFAR-100 or vice versa?). Check the spec and the files")
    pixels = rows[:, label_bytes:].reshape(-1, 3, 32, 32)  # 1024 R, 1024 G, 1024 B, row-major
    return pixels, labels


def _read_set(folder: Path, files: tuple, label_bytes: int, num_classes: int, title: str) -> tuple:
    parts = [_read_records(folder / f, label_bytes, num_classes, title) for f in files]
    pixels = np.concatenate([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([l for _, l in parts]) if len(parts) > 1 else parts[0][1]
    x = torch.from_numpy(pixels.astype(np.float32))
    x.div_(255.0)
    return x, torch.from_numpy(labels)


def _load_cifar(name: str, directory: str, spec: str) -> Split:
    _, train, test, label_bytes, num_classes, title = _CIFAR[name]
    folder = _find_cifar_dir(name, directory, spec)
    x_tr, y_tr = _read_set(folder, train, label_bytes, num_classes, title)
    x_te, y_te = _read_set(folder, test, label_bytes, num_classes, title)
    return _normalise(name, x_tr, y_tr, x_te, y_te, num_classes=num_classes, dims=2)
