"""Tests for asrfx.data: the offline datasets, the CIFAR binary parsers and batches()."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from asrfx import data
from asrfx.data import Split, batches, load_dataset
from asrfx.errors import InputError

# ----------------------------------------------------------------------------------------------
# helpers


def _train_stats(x: torch.Tensor) -> tuple:
    dims = tuple(d for d in range(x.dim()) if d != 1)
    return x.double().mean(dims), x.double().std(dims, correction=0)


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_dataset("digits")


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_labels(digits):
    assert digits.name == "digits"
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.dims == 2
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64 and digits.y_test.dtype == torch.int64
    assert digits.x_train.shape[1:] == digits.x_test.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) == len(digits.y_train) == 1257
    assert len(digits.x_test) == len(digits.y_test) == 540
    assert len(digits.x_train) + len(digits.x_test) == 1797
    for y in (digits.y_train, digits.y_test):
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert set(y.tolist()) == set(range(10))  # stratified: every class in both sets
    assert torch.isfinite(digits.x_train).all() and torch.isfinite(digits.x_test).all()


def test_digits_normalised_with_train_stats(digits):
    mean, std = _train_stats(digits.x_train)
    assert torch.allclose(mean, torch.zeros(1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(1, dtype=torch.float64), atol=1e-4)
    # the test set got the same map: its statistics are close to, not exactly, (0, 1)
    tmean, tstd = _train_stats(digits.x_test)
    assert abs(float(tmean)) < 0.1 and abs(float(tstd) - 1) < 0.1
    assert not torch.allclose(tmean, mean, atol=1e-6)


def test_digits_deterministic_across_calls_and_seeds(digits):
    again = load_dataset("digits", seed=123)
    for a, b in [(digits.x_train, again.x_train), (digits.y_train, again.y_train),
                 (digits.x_test, again.x_test), (digits.y_test, again.y_test)]:
        assert torch.equal(a, b)
    assert load_dataset(" Digits ").input_shape == (1, 8, 8)  # case / space tolerant


def test_digits_matches_sklearn_split(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, _, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.3, random_state=0,
                                        stratify=d.target)
    assert digits.y_train.tolist() == y_tr.tolist()
    assert digits.y_test.tolist() == y_te.tolist()


def test_split_repr_is_short(digits):
    assert repr(digits) == "Split(name='digits', num_classes=10, in_channels=1, dims=2)"


# ----------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_shapes_and_cache():
    random.seed(7)
    np.random.seed(7)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    s = load_dataset("mnist1d")
    assert s.name == "mnist1d" and s.dims == 1 and s.in_channels == 1 and s.num_classes == 10
    assert s.input_shape == (1, 40)
    assert s.x_train.shape == (4000, 1, 40) and s.x_test.shape == (1000, 1, 40)
    assert s.y_train.shape == (4000,) and s.y_test.shape == (1000,)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert set(s.y_train.tolist()) == set(range(10))
    mean, std = _train_stats(s.x_train)
    assert abs(float(mean)) < 1e-5 and abs(float(std) - 1) < 1e-4
    # the generator reseeds the global RNGs; load_dataset puts them back
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state)
    # second load comes from the in-process cache, equal and independent of the first
    s.x_train.zero_()
    again = load_dataset("mnist1d", seed=5)
    assert data._mnist1d_arrays.cache_info().hits >= 1
    assert float(again.x_train.abs().sum()) > 0
    assert torch.equal(again.y_test, load_dataset("mnist1d").y_test)


# ----------------------------------------------------------------------------------------------
# CIFAR binary parsers on synthetic files


def _hot_images(n: int, seed: int) -> tuple:
    """n uint8 images (n, 3, 32, 32) and, per image, the (c, h, w, value) hot pixels set in it.

    Each image has background value 10 + k and one hot pixel of 250 per channel at a
    position that differs from image to image.
    """
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, 3, 32, 32), dtype=np.uint8)
    hot = []
    for k in range(n):
        imgs[k] = 10 + k
        spots = []
        for c in range(3):
            h, w = (int(v) for v in rng.integers(0, 32, size=2))
            imgs[k, c, h, w] = 250
            spots.append((c, h, w))
        hot.append(spots)
    return imgs, hot


def _records(imgs: np.ndarray, labels: list) -> bytes:
    """Serialise images into CIFAR records, writing every pixel byte by its documented offset.

    ``labels[k]`` is a tuple of the label bytes of record k (1 for CIFAR-10, 2 for CIFAR-100).
    The pixel bytes are 1024 R, then 1024 G, then 1024 B, each plane row-major 32x32; the offset
    formula is written out here so the test does not share the parser's reshape.
    """
    out = bytearray()
    for img, lab in zip(imgs, labels):
        rec = bytearray(len(lab) + 3072)
        rec[:len(lab)] = bytes(lab)
        for c in range(3):
            for h in range(32):
                for w in range(32):
                    rec[len(lab) + c * 1024 + h * 32 + w] = int(img[c, h, w])
        out += rec
    return bytes(out)


def _expected(train_imgs: np.ndarray, imgs: np.ndarray) -> torch.Tensor:
    tr = torch.from_numpy(train_imgs).double() / 255
    mean, std = _train_stats(tr)
    x = torch.from_numpy(imgs).double() / 255
    return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()


def _write_cifar10(folder, per_batch: int = 2, n_test: int = 3) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    train_imgs, train_labels, hot = [], [], []
    for b in range(1, 6):
        imgs, spots = _hot_images(per_batch, seed=b)
        labels = [(b * per_batch + k) % 10 for k in range(per_batch)]
        (folder / f"data_batch_{b}.bin").write_bytes(_records(imgs, [(l,) for l in labels]))
        train_imgs.append(imgs)
        train_labels += labels
        hot += spots
    test_imgs, _ = _hot_images(n_test, seed=99)
    test_labels = [9 - k for k in range(n_test)]
    (folder / "test_batch.bin").write_bytes(_records(test_imgs, [(l,) for l in test_labels]))
    return np.concatenate(train_imgs), train_labels, hot, test_imgs, test_labels


@pytest.mark.parametrize("layout", ["direct", "subfolder"])
def test_cifar10_binary_layout(tmp_path, layout):
    folder = tmp_path if layout == "direct" else tmp_path / "cifar-10-batches-bin"
    train_imgs, train_labels, hot, test_imgs, test_labels = _write_cifar10(folder)
    s = load_dataset(f"cifar10:{tmp_path}")
    assert s.name == "cifar10" and s.num_classes == 10 and s.in_channels == 3 and s.dims == 2
    assert s.input_shape == (3, 32, 32)
    assert s.x_train.shape == (10, 3, 32, 32) and s.x_test.shape == (3, 3, 32, 32)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.y_train.tolist() == train_labels  # batches 1..5 in order
    assert s.y_test.tolist() == test_labels
    # each hot pixel is the unique maximum of its (record, channel) plane, at the right (h, w)
    for k, spots in enumerate(hot):
        for c, h, w in spots:
            plane = s.x_train[k, c]
            assert divmod(int(plane.argmax()), 32) == (h, w)
            assert int((plane == plane.max()).sum()) == 1
    assert torch.allclose(s.x_train, _expected(train_imgs, train_imgs), atol=1e-5)
    assert torch.allclose(s.x_test, _expected(train_imgs, test_imgs), atol=1e-5)
    mean, std = _train_stats(s.x_train)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("layout", ["direct", "subfolder"])
def test_cifar100_binary_layout_uses_fine_label(tmp_path, layout):
    folder = tmp_path if layout == "direct" else tmp_path / "cifar-100-binary"
    folder.mkdir(parents=True, exist_ok=True)
    train_imgs, hot = _hot_images(4, seed=1)
    test_imgs, _ = _hot_images(2, seed=2)
    train_lab = [(3, 42), (19, 99), (0, 0), (7, 55)]  # (coarse, fine)
    test_lab = [(5, 17), (12, 64)]
    (folder / "train.bin").write_bytes(_records(train_imgs, train_lab))
    (folder / "test.bin").write_bytes(_records(test_imgs, test_lab))
    s = load_dataset(f"cifar100:{tmp_path}")
    assert s.name == "cifar100" and s.num_classes == 100 and s.input_shape == (3, 32, 32)
    assert s.y_train.tolist() == [42, 99, 0, 55]
    assert s.y_test.tolist() == [17, 64]
    for k, spots in enumerate(hot):
        for c, h, w in spots:
            assert divmod(int(s.x_train[k, c].argmax()), 32) == (h, w)
    assert torch.allclose(s.x_train, _expected(train_imgs, train_imgs), atol=1e-5)
    assert torch.allclose(s.x_test, _expected(train_imgs, test_imgs), atol=1e-5)


def test_cifar_constant_channel_gives_finite_values(tmp_path):
    imgs = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    imgs[1, 0] = 200  # channel 0 varies, channels 1 and 2 are constant
    (tmp_path / "train.bin").write_bytes(_records(imgs, [(0, 1), (0, 2)]))
    (tmp_path / "test.bin").write_bytes(_records(imgs, [(0, 1), (0, 2)]))
    s = load_dataset(f"cifar100:{tmp_path}")
    assert torch.isfinite(s.x_train).all()
    assert float(s.x_train[:, 1:].abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("spec", ["imagenet", "cifar1000:/tmp", "", "mnist"])
def test_unknown_spec_lists_accepted(spec):
    with pytest.raises(InputError) as e:
        load_dataset(spec)
    msg = str(e.value)
    assert "unknown dataset spec" in msg
    for accepted in ("digits", "mnist1d", "cifar10:DIR", "cifar100:DIR"):
        assert accepted in msg


@pytest.mark.parametrize("spec, needle", [
    ("cifar10", "needs the directory"),
    ("cifar100:  ", "needs the directory"),
    ("digits:foo", "takes no argument"),
])
def test_malformed_spec(spec, needle):
    with pytest.raises(InputError, match=needle):
        load_dataset(spec)


def test_bad_spec_and_seed_types():
    with pytest.raises(InputError, match="spec string"):
        load_dataset(None)
    with pytest.raises(InputError, match="seed must be an int"):
        load_dataset("digits", seed="0")


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar10:{missing}")
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "CIFAR binary version" in msg and "cifar-10-binary.tar.gz" in msg


def test_dir_is_a_file(tmp_path):
    f = tmp_path / "cifar-10-binary.tar.gz"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="is not a directory"):
        load_dataset(f"cifar10:{f}")


def test_missing_files_are_named(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar10:{tmp_path}")
    msg = str(e.value)
    assert "data_batch_3.bin" in msg and "data_batch_1.bin" not in msg
    assert str(tmp_path / "cifar-10-batches-bin") in msg  # the most complete place is reported
    assert "CIFAR binary version" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar100:{tmp_path}")
    assert "train.bin" in str(e.value) and "test.bin" in str(e.value)
    assert "cifar-100-binary.tar.gz" in str(e.value)


def test_pickle_version_is_refused_with_hint(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    for name in ["data_batch_1", "test_batch", "batches.meta"]:
        (py / name).write_bytes(b"\x80\x04not read")
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar10:{tmp_path}")
    msg = str(e.value)
    assert "pickle" in msg and "binary version" in msg


def test_truncated_file(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar10:{tmp_path}")
    msg = str(e.value)
    assert str(path) in msg and "3073" in msg and "truncated" in msg


def test_empty_file(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_2.bin").write_bytes(b"")
    with pytest.raises(InputError, match="data_batch_2.bin has 0 bytes"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar10_files_given_as_cifar100(tmp_path):
    # 3074 records of 3073 bytes == 3073 records of 3074 bytes: the size check passes, the
    # label check catches it
    rec = np.zeros((3074, 3073), dtype=np.uint8)
    rec[:, 0] = 9
    rec[:, 1:] = 200  # pixel bytes land where CIFAR-100 labels are read
    (tmp_path / "train.bin").write_bytes(rec.tobytes())
    (tmp_path / "test.bin").write_bytes(rec.tobytes())
    with pytest.raises(InputError, match="label outside the CIFAR-100 classes"):
        load_dataset(f"cifar100:{tmp_path}")


def test_label_out_of_range(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "data_batch_4.bin"
    raw = bytearray(path.read_bytes())
    raw[3073] = 10  # label byte of record 1
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"data_batch_4.bin: record 1 has a label outside"):
        load_dataset(f"cifar10:{tmp_path}")


def test_sklearn_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InputError) as e:
        load_dataset("digits")
    msg = str(e.value)
    assert "pip install scikit-learn" in msg and "asrfx[demo]" in msg


def test_mnist1d_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(InputError) as e:
        load_dataset("mnist1d")
    msg = str(e.value)
    assert "pip install mnist1d" in msg and "asrfx[demo]" in msg


# ----------------------------------------------------------------------------------------------
# batches


def _xy(n: int = 23) -> tuple:
    x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
    return x, torch.arange(n)


def test_batches_in_order_cover_once():
    x, y = _xy()
    out = list(batches(x, y, 5))
    assert [len(xb) for xb, _ in out] == [5, 5, 5, 5, 3]
    assert all(isinstance(b, tuple) and len(b) == 2 for b in out)
    assert torch.equal(torch.cat([yb for _, yb in out]), y)
    assert torch.equal(torch.cat([xb for xb, _ in out]), x)


def test_batches_shuffle_covers_once_and_is_deterministic():
    x, y = _xy()

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return list(batches(x, y, 4, shuffle=True, generator=g))

    a, b, c = epoch(0), epoch(0), epoch(1)
    ya = torch.cat([yb for _, yb in a])
    assert sorted(ya.tolist()) == list(range(23))  # every sample exactly once
    assert not torch.equal(ya, y)  # actually shuffled
    for (xa, yb_a), (xb_, yb_b) in zip(a, b):
        assert torch.equal(xa, xb_) and torch.equal(yb_a, yb_b)
    assert not torch.equal(ya, torch.cat([yb for _, yb in c]))
    for xb, yb in a:  # pairs stay together
        assert torch.equal(xb[:, 0], yb.float() * 2)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ya, torch.randperm(23, generator=g))


def test_batches_successive_epochs_differ_with_one_generator():
    x, y = _xy()
    g = torch.Generator().manual_seed(3)
    e1 = torch.cat([yb for _, yb in batches(x, y, 8, shuffle=True, generator=g)])
    e2 = torch.cat([yb for _, yb in batches(x, y, 8, shuffle=True, generator=g)])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(23))
    assert not torch.equal(e1, e2)


def test_batches_edge_cases():
    x, y = _xy(4)
    assert [len(xb) for xb, _ in batches(x, y, 10)] == [4]
    assert list(batches(x[:0], y[:0], 3)) == []
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="batch_size must be a positive int"):
            batches(x, y, bad)  # raised at call time, before iteration
    with pytest.raises(InputError, match="x has 4 samples but y has 3"):
        batches(x, y[:3], 2)


def test_batches_on_a_split(digits):
    g = torch.Generator().manual_seed(0)
    n = sum(len(yb) for _, yb in batches(digits.x_train, digits.y_train, 128, shuffle=True,
                                          generator=g))
    assert n == len(digits.y_train)


def test_public_api():
    assert set(data.__all__) == {"Split", "load_dataset", "batches", "SPECS"}
