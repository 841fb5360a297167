"""Classification sources: npz, csv and MNIST-1D; the transfer set; every bad file is a UserError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distilflow.config import DataConfig, FilesConfig, MNIST1DConfig, load_config
from distilflow.data.classification import load_classification
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX


def files(source: str, *, seed: int = 42, **fields) -> DataConfig:
    """A ``data`` config of an npz or csv source: ``fields`` are its ``data.files`` keys."""
    return DataConfig(source=source, seed=seed, files=FilesConfig(**fields))


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _labeled(n: int, width: int = 5, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)).astype(np.float32)
    x[:, 0] = np.arange(n)  # a row id, so that splits can be checked row by row
    y = np.arange(n) % classes
    return x, y


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in x}


# ---------------------------------------------------------------- npz


def test_npz_with_test_path_keeps_both_files_as_they_are(tmp_path):
    x, y = _labeled(12)
    tx, ty = _labeled(6, seed=1)
    cfg = files("npz", path=_npz(tmp_path / "train.npz", x=x, y=y), test_path=_npz(tmp_path / "test.npz", x=tx, y=ty))
    data = load_classification(cfg)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.long
    assert torch.equal(data.train_x, torch.from_numpy(x))
    assert torch.equal(data.train_y, torch.from_numpy(y))
    assert torch.equal(data.test_x, torch.from_numpy(tx))
    assert torch.equal(data.test_y, torch.from_numpy(ty))
    assert data.input_shape == (5,)
    assert data.num_classes == 3
    assert data.transfer_x is None


def test_npz_test_fraction_split_is_a_seeded_partition(tmp_path):
    # Sorted by label: a split that took the file's tail would hold a single class.
    x, y = _labeled(40)
    order = np.argsort(y, kind="stable")
    path = _npz(tmp_path / "d.npz", x=x[order], y=y[order])
    data = load_classification(files("npz", path=path, test_fraction=0.25, seed=3))
    assert len(data.test_x) == 10 and len(data.train_x) == 30
    assert _rows(data.train_x) | _rows(data.test_x) == _rows(torch.from_numpy(x))
    assert not _rows(data.train_x) & _rows(data.test_x)
    # Labels travel with their rows (row id in column 0 decides the label).
    assert torch.equal(data.test_y, data.test_x[:, 0].long() % 3)
    assert len(set(data.test_y.tolist())) > 1

    again = load_classification(files("npz", path=path, test_fraction=0.25, seed=3))
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_x, data.train_x)
    other = load_classification(files("npz", path=path, test_fraction=0.25, seed=4))
    assert _rows(other.test_x) != _rows(data.test_x)


def test_npz_transfer_set_is_unlabeled_in_distill_set(tmp_path):
    x, y = _labeled(8)
    ux = np.random.default_rng(5).normal(size=(5, 5)).astype(np.float32)
    cfg = files(
        "npz",
        path=_npz(tmp_path / "train.npz", x=x, y=y),
        test_path=_npz(tmp_path / "test.npz", x=x[:4], y=y[:4]),
        transfer_path=_npz(tmp_path / "transfer.npz", x=ux),
    )
    data = load_classification(cfg)
    assert torch.equal(data.transfer_x, torch.from_numpy(ux))
    dx, dy = data.distill_set()
    assert torch.equal(dx, torch.cat([torch.from_numpy(x), torch.from_numpy(ux)]))
    assert dy.tolist() == y.tolist() + [IGNORE_INDEX] * 5
    assert IGNORE_INDEX == -100


def test_distill_set_without_transfer_is_the_train_set(tmp_path):
    x, y = _labeled(8)
    data = load_classification(files("npz", path=_npz(tmp_path / "d.npz", x=x, y=y), test_fraction=0.25))
    dx, dy = data.distill_set()
    assert dx is data.train_x and dy is data.train_y


def test_npz_float_labels_with_integer_values_are_accepted(tmp_path):
    x, y = _labeled(8)
    data = load_classification(
        files("npz", path=_npz(tmp_path / "d.npz", x=x, y=y.astype(np.float64)), test_fraction=0.25)
    )
    assert data.train_y.dtype == torch.long
    assert set(data.train_y.tolist()) | set(data.test_y.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- csv


def test_csv_label_column_anywhere_and_other_columns_are_features(tmp_path):
    train = _csv(tmp_path / "train.csv", "a,label,b\n1.5,0,2\n3,1,4\n5,2,6.25\n7,1,8\n")
    test = _csv(tmp_path / "test.csv", "a,label,b\n9,0,10\n11,2,12\n")
    data = load_classification(files("csv", path=train, test_path=test))
    assert data.train_x.tolist() == [[1.5, 2], [3, 4], [5, 6.25], [7, 8]]
    assert data.train_y.tolist() == [0, 1, 2, 1]
    assert data.test_x.tolist() == [[9, 10], [11, 12]]
    assert data.test_y.tolist() == [0, 2]


def test_csv_custom_label_column_and_csv_transfer(tmp_path):
    train = _csv(tmp_path / "train.csv", "f1,f2,cls\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,10,1\n")
    # A transfer file may carry a label column; it is dropped, the rest are features.
    transfer = _csv(tmp_path / "transfer.csv", "f1,cls,f2\n0.5,1,0.25\n0.75,0,1\n")
    unlabeled = _csv(tmp_path / "unlabeled.csv", "f1,f2\n-1,-2\n")
    data = load_classification(files("csv", path=train, label_column="cls", transfer_path=transfer, test_fraction=0.2))
    assert len(data.train_x) == 4 and len(data.test_x) == 1
    assert data.transfer_x.tolist() == [[0.5, 0.25], [0.75, 1]]
    data = load_classification(files("csv", path=train, label_column="cls", transfer_path=unlabeled, test_fraction=0.2))
    assert data.transfer_x.tolist() == [[-1, -2]]
    _, dy = data.distill_set()
    assert dy[-1].item() == IGNORE_INDEX and (dy[:-1] >= 0).all()


# ---------------------------------------------------------------- errors name the file


def _error(cfg: DataConfig) -> str:
    with pytest.raises(UserError) as info:
        load_classification(cfg)
    return str(info.value)


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.npz")
    assert missing in _error(files("npz", path=missing))
    x, y = _labeled(8)
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    assert missing in _error(files("npz", path=path, test_path=missing))
    assert missing in _error(files("npz", path=path, test_fraction=0.25, transfer_path=missing))


def test_npz_without_x_or_y(tmp_path):
    x, y = _labeled(8)
    no_y = _npz(tmp_path / "no_y.npz", x=x)
    message = _error(files("npz", path=no_y))
    assert no_y in message and "'y'" in message
    no_x = _npz(tmp_path / "no_x.npz", features=x, y=y)
    message = _error(files("npz", path=no_x))
    assert no_x in message and "'x'" in message and "features" in message
    good = _npz(tmp_path / "good.npz", x=x, y=y)
    message = _error(files("npz", path=good, test_fraction=0.25, transfer_path=no_x))
    assert no_x in message and "'x'" in message


def test_npz_that_is_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive at all")
    message = _error(files("npz", path=str(path)))
    assert str(path) in message


def test_csv_without_label_column(tmp_path):
    path = _csv(tmp_path / "d.csv", "a,b,target\n1,2,0\n3,4,1\n")
    message = _error(files("csv", path=path))
    assert path in message and "'label'" in message and "a, b, target" in message


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("1,2,0\n3,abc,1\n5,6,0\n", 3),  # non-numeric cell
        ("1,2,0\n3,4,1\n5,,0\n", 4),  # empty cell
        ("1,2,0\n3,4,1\n5,6,0\n7,nan,1\n", 5),  # explicit NaN
    ],
)
def test_csv_bad_cell_names_file_and_line(tmp_path, body, line):
    path = _csv(tmp_path / "d.csv", "a,b,label\n" + body)
    message = _error(files("csv", path=path))
    assert path in message and f"line {line}" in message


def test_csv_ragged_rows_and_header_only(tmp_path):
    ragged = _csv(tmp_path / "ragged.csv", "a,b,label\n1,2,0\n3,1\n")
    assert ragged in _error(files("csv", path=ragged))
    header_only = _csv(tmp_path / "empty.csv", "a,b,label\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reader's own warnings (numpy's, an unclosed file) never escape
        assert "has no data rows" in _error(files("csv", path=header_only))
        assert "line 3 has 2 values; the header has 3 columns" in _error(files("csv", path=ragged))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_file(tmp_path, bad):
    x, y = _labeled(8)
    x[3, 2] = bad
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    message = _error(files("npz", path=path))
    assert path in message and "NaN or inf" in message
    good = _npz(tmp_path / "good.npz", x=_labeled(8)[0], y=y)
    transfer = _npz(tmp_path / "transfer.npz", x=x)
    assert transfer in _error(files("npz", path=good, test_fraction=0.25, transfer_path=transfer))


def test_non_integer_labels_name_the_file(tmp_path):
    x, y = _labeled(8)
    path = _npz(tmp_path / "d.npz", x=x, y=y + 0.5)
    message = _error(files("npz", path=path))
    assert path in message and "integer" in message
    csv = _csv(tmp_path / "d.csv", "a,label\n1,0\n2,1.5\n3,1\n")
    assert csv in _error(files("csv", path=csv))


def test_negative_labels_and_a_single_class(tmp_path):
    x, y = _labeled(8)
    path = _npz(tmp_path / "neg.npz", x=x, y=y - 1)
    message = _error(files("npz", path=path))
    assert path in message and "-1" in message
    one = _npz(tmp_path / "one.npz", x=x, y=np.zeros(8, dtype=np.int64))
    assert "single class" in _error(files("npz", path=one, test_fraction=0.25))


def test_bad_shapes_name_the_file(tmp_path):
    x, y = _labeled(8, width=5)
    path = _npz(tmp_path / "train.npz", x=x, y=y)
    test = _npz(tmp_path / "test.npz", x=_labeled(4, width=6)[0], y=y[:4])
    message = _error(files("npz", path=path, test_path=test))
    assert test in message and "(6,)" in message and "(5,)" in message
    transfer = _npz(tmp_path / "transfer.npz", x=np.zeros((3, 4), dtype=np.float32))
    message = _error(files("npz", path=path, test_fraction=0.25, transfer_path=transfer))
    assert transfer in message and "(4,)" in message and "(5,)" in message
    flat = _npz(tmp_path / "flat.npz", x=np.arange(8.0), y=y)
    assert flat in _error(files("npz", path=flat))
    y2d = _npz(tmp_path / "y2d.npz", x=x, y=y.reshape(4, 2))
    assert y2d in _error(files("npz", path=y2d))
    length = _npz(tmp_path / "length.npz", x=x, y=y[:5])
    message = _error(files("npz", path=length, test_fraction=0.25))
    assert length in message and "8" in message and "5" in message


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_split_sizes_and_cache_reuse(tmp_path, monkeypatch):
    generated = MNIST1DConfig(num_samples=100, train_split=0.8, transfer_size=40, transfer_seed=1)
    cfg = DataConfig(source="mnist1d", cache_dir=str(tmp_path), mnist1d=generated)
    data = load_classification(cfg)
    assert data.train_x.shape == (80, 40) and data.test_x.shape == (20, 40)
    assert data.train_y.shape == (80,) and data.test_y.shape == (20,)
    assert data.transfer_x.shape == (40, 40)
    assert data.num_classes == 10
    assert torch.isfinite(data.train_x).all()
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all(name.startswith("mnist1d-") and name.endswith(".npz") for name in cached)

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("make_dataset called although the cache holds the data")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_classification(cfg)
    for name in ("train_x", "train_y", "test_x", "test_y", "transfer_x"):
        assert torch.equal(getattr(again, name), getattr(data, name)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == cached

    # Another seed is another data set: it is generated (here: the patched generator fails).
    with pytest.raises(AssertionError, match="make_dataset called"):
        load_classification(
            DataConfig(source="mnist1d", seed=7, cache_dir=str(tmp_path), mnist1d=MNIST1DConfig(100, transfer_size=0))
        )


def test_factory_source_returns_the_arrays_and_errors_name_the_spec(tmp_path, monkeypatch):
    module = tmp_path / "my_data_mod.py"
    module.write_text(
        "import numpy as np\n"
        "def make():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return {'x': rng.normal(size=(30, 4)), 'y': np.arange(30) % 3,\n"
        "            'x_test': rng.normal(size=(9, 4)), 'y_test': np.arange(9) % 3,\n"
        "            'x_transfer': rng.normal(size=(5, 4))}\n"
        "def bad():\n"
        "    return {'x': np.zeros((3, 4))}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_classification(load_config(None, ["data.source=my_data_mod:make"]).data)
    assert data.train_x.shape == (30, 4) and data.test_x.shape == (9, 4) and data.transfer_x.shape == (5, 4)
    assert data.train_y.tolist() == (np.arange(30) % 3).tolist() and data.num_classes == 3
    x, y = data.distill_set()
    assert len(x) == 35 and (y[30:] == -100).all()
    with pytest.raises(UserError, match="my_data_mod:bad.*must return a dict with x, y, x_test, y_test"):
        load_classification(load_config(None, ["data.source=my_data_mod:bad"]).data)
    with pytest.raises(UserError, match="data.source.*'nope'"):
        load_config(None, ["data.source=nope"])
