"""A user's own classification data, for every command that reads data (``--data``).

Three forms, besides the built-in names of :mod:`asrfx.data`:

* a ``.npz`` file (``numpy.savez``) with arrays ``x`` (inputs, ``(N, C, *spatial)``, any real
  dtype) and ``y`` (integer labels ``0..K-1``, ``(N,)``), or with ``x_train``, ``y_train``,
  ``x_test``, ``y_test`` for a split of the user's own; read with ``allow_pickle=False``;
* a directory of images in class folders (``DIR/<class>/<image>``, the ImageFolder layout):
  classes are the sub-folder names in sorted order; every image must have one size; read with
  Pillow, grey (one channel) when every image is grey, else RGB;
* ``module:function`` (or ``module:function(arg=1)`` with literal arguments), imported from the
  working directory like ``--model`` factories: ``function()`` returns an iterable of
  ``(inputs, labels)`` batches (tensors or arrays, e.g. a DataLoader).

Without a split of its own, the data is split into train and test sets by a seeded random
permutation (``test_fraction`` of the samples, at least one, for testing). Inputs are normalised
per channel with the train set's statistics, as the built-in datasets are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError

__all__ = ["load_user_data", "is_user_data", "USER_FORMS"]

#: How a user names their data, for help texts and error messages.
USER_FORMS = ("FILE.npz (arrays x, y)", "DIR of class folders of images", "module:function")

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(.*\))?$", re.DOTALL)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                   ".pgm"}


def is_user_data(spec: str) -> bool:
    """Whether ``spec`` names user data (a path that exists, a ``.npz`` name, or
    ``module:function``) rather than a built-in dataset."""
    text = spec.strip()
    if not text:  # Path("") is the working directory: never data by accident
        return False
    return Path(text).expanduser().exists() or text.endswith(".npz") or \
        bool(_FUNCTION.match(text))


def load_user_data(spec: str, *, test_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Read user data: ``(name, x_train, y_train, x_test, y_test, num_classes)``, inputs
    float32 ``(N, C, *spatial)`` (not yet normalised), labels int64.

    Raises:
        InputError: a missing file or folder, arrays or batches of the wrong kind or shape,
            labels that are not integers ``0..K-1``, images of different sizes, a function
            that cannot be imported or that raises.
    """
    text = spec.strip()
    path = Path(text).expanduser()
    if text.endswith(".npz") or path.is_file():
        name, arrays = path.stem, _read_npz(path, spec)
    elif path.is_dir():
        name, arrays = path.name, _read_image_folder(path, spec)
    elif _FUNCTION.match(text):
        name, arrays = text.partition(":")[2].partition("(")[0], _read_function(text)
    else:
        raise InputError(f"--data {spec!r}: no such file or folder")
    if len(arrays) == 2:
        arrays = _split(*arrays, test_fraction, seed, spec)
    x_train, y_train, x_test, y_test = (_inputs(a, spec) if i % 2 == 0 else _labels(a, spec)
                                        for i, a in enumerate(arrays))
    for x, y, which in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise InputError(f"--data {spec!r}: {len(x)} {which} inputs but {len(y)} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(f"--data {spec!r}: train inputs are {tuple(x_train.shape[1:])}, test "
                         f"inputs {tuple(x_test.shape[1:])}; give both one shape")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return name, x_train, y_train, x_test, y_test, num_classes


def _read_npz(path: Path, spec: str) -> tuple:
    if not path.exists():
        raise InputError(f"--data {spec!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - whatever the file is, it is the user's input
        raise InputError(f"--data {spec!r}: cannot read it as a numpy .npz file ({e}); save "
                         f"one with numpy.savez(path, x=inputs, y=labels)") from None
    for keys in (("x_train", "y_train", "x_test", "y_test"), ("x", "y")):
        if all(k in arrays for k in keys):
            return tuple(arrays[k] for k in keys)
    raise InputError(f"--data {spec!r}: holds arrays {sorted(arrays)}; expected x and y "
                     f"(or x_train, y_train, x_test, y_test): numpy.savez(path, x=inputs, "
                     f"y=labels)")


def _read_image_folder(root: Path, spec: str) -> tuple:
    try:
        from PIL import Image
    except ImportError as e:
        raise InputError(f"--data {spec!r}: reading images needs Pillow ({e}); "
                         f"pip install pillow") from None
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted(c.rglob("*"))
             if f.suffix.lower() in _IMAGE_SUFFIXES]
    if len(classes) < 2 or not files:
        raise InputError(f"--data {spec!r}: expected a folder of class folders holding images "
                         f"(DIR/<class>/<image>.png); found {len(classes)} folders and "
                         f"{len(files)} images")
    images = []
    for f, _ in files:
        with Image.open(f) as im:
            images.append(im.copy())
    grey = all(im.mode in ("L", "1", "I;16", "I") for im in images)
    arrays = [np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
              for im in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise InputError(f"--data {spec!r}: images of {len(sizes)} sizes "
                         f"({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:4])}); resize them "
                         f"to one size first")
    x = np.stack([a[None] if grey else a.transpose(2, 0, 1) for a in arrays])
    return x, np.array([k for _, k in files], dtype=np.int64)


def _read_function(text: str) -> tuple:
    from .zoo import import_callable

    fn, args, kwargs = import_callable(text, "--data")
    try:
        data = fn(*args, **kwargs)
        xs, ys = [], []
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise InputError(f"--data {text!r}: each batch must be (inputs, labels), got "
                                 f"{type(item).__name__}")
            xs.append(_tensor(item[0]))
            ys.append(_tensor(item[1]))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: say whose
        raise InputError(f"--data {text!r}: the function raised {type(e).__name__}: {e}; it "
                         f"must return an iterable of (inputs, labels) batches") from e
    if not xs:
        raise InputError(f"--data {text!r}: the function gave no batches")
    try:
        return torch.cat(xs), torch.cat(ys)
    except RuntimeError as e:
        raise InputError(f"--data {text!r}: batches of different shapes ({e})") from None


def _tensor(a: Any) -> torch.Tensor:
    """``a`` as a tensor (arrays, lists and numbers through numpy)."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _split(x: Any, y: Any, test_fraction: float, seed: int, spec: str) -> tuple:
    n = len(x)
    if n < 2:
        raise InputError(f"--data {spec!r}: {n} sample(s); at least 2 are needed (train, test)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    k = min(n - 1, max(1, int(round(n * test_fraction))))
    x, y = np.asarray(x) if not isinstance(x, torch.Tensor) else x, \
        np.asarray(y) if not isinstance(y, torch.Tensor) else y
    test, train = order[:k], order[k:]
    return x[train], y[train], x[test], y[test]


def _inputs(a: Any, spec: str) -> torch.Tensor:
    t = _tensor(a)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16,
                                                 torch.int32, torch.int64)) or t.is_complex():
        raise InputError(f"--data {spec!r}: inputs of dtype {t.dtype}; give real numbers")
    if t.dim() < 2:
        raise InputError(f"--data {spec!r}: inputs of shape {tuple(t.shape)}; expected "
                         f"(N, C, *spatial), e.g. (N, 1, 28, 28) for grey images")
    return t.to(torch.float32).clone()


def _labels(a: Any, spec: str) -> torch.Tensor:
    t = _tensor(a)
    if t.is_floating_point() and bool(torch.all(t == t.round())):
        t = t.round()
    elif t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise InputError(f"--data {spec!r}: labels of dtype {t.dtype}; give integer classes "
                         f"0..K-1")
    t = t.reshape(-1).to(torch.int64) if t.dim() == 2 and t.shape[1] == 1 else t.to(torch.int64)
    if t.dim() != 1 or len(t) == 0 or int(t.min()) < 0:
        raise InputError(f"--data {spec!r}: labels of shape {tuple(t.shape)} with minimum "
                         f"{int(t.min()) if t.numel() else None}; give one integer class "
                         f"0..K-1 per sample")
    return t
