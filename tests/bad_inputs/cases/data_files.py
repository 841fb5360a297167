"""The classifier's own files (data.source npz / csv, data.files): empty, ragged, NaN, wrong dtypes,
object arrays, label ranges, shapes that do not agree."""

from __future__ import annotations

import numpy as np

from ..case import case, run_files


def npz(**arrays):
    """A maker writing ``arrays`` as an .npz file (object arrays pickled, as numpy does by default)."""

    def make(path, kit) -> None:
        with path.open("wb") as f:
            np.savez(f, **arrays)

    return make


def _rows(n: int, features: int = 3, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), np.arange(n) % classes


X, Y = _rows(20)
NPZ = run_files("npz", "$dir/d.npz")
CSV = run_files("csv", "$dir/d.csv")
GOOD_CSV = "a,b,c,label\n" + "".join(f"{i},{i + 1},{i * 2},{i % 2}\n" for i in range(20))


def _nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[3, 1] = np.nan
    return x


CASES = [
    # npz
    case("npz-missing", NPZ, "d.npz' does not exist"),
    case("npz-empty-file", NPZ, "is not a readable .npz file", {"d.npz": b""}),
    case("npz-not-a-zip", NPZ, "is not a readable .npz file", {"d.npz": b"PK\x03\x04 not really a zip"}),
    case("npz-text", NPZ, "is not a readable .npz file", {"d.npz": "x,y\n1,2\n"}),
    case("npz-no-y", NPZ, "it needs 'x' and 'y'", {"d.npz": npz(x=X)}),
    case("npz-no-arrays", NPZ, "it needs 'x' and 'y'", {"d.npz": npz()}),
    case("npz-zero-samples", NPZ, "no samples (its arrays have 0 rows)", {"d.npz": npz(x=X[:0], y=Y[:0])}),
    case("npz-one-sample", NPZ, "d.npz", {"d.npz": npz(x=X[:1], y=Y[:1])}),
    case("npz-x-1d", NPZ, "features need shape (samples, ...)", {"d.npz": npz(x=X[:, 0], y=Y)}),
    case("npz-x-no-features", NPZ, "features", {"d.npz": npz(x=X[:, :0], y=Y)}),
    case("npz-x-strings", NPZ, "features must be numbers", {"d.npz": npz(x=X.astype(str), y=Y)}),
    case("npz-x-bool", NPZ, "features must be numbers", {"d.npz": npz(x=X > 0, y=Y)}),
    case("npz-x-complex", NPZ, "features must be real numbers", {"d.npz": npz(x=X.astype(np.complex64), y=Y)}),
    case("npz-x-object", NPZ, "object arrays", {"d.npz": npz(x=X.astype(object), y=Y)}),
    case("npz-x-nan", NPZ, "features hold NaN or inf", {"d.npz": npz(x=_nan(X), y=Y)}),
    case("npz-x-inf", NPZ, "features hold NaN or inf", {"d.npz": npz(x=X * np.float32("inf"), y=Y)}),
    case(
        "npz-x-overflows-float32", NPZ, "features hold NaN or inf", {"d.npz": npz(x=X.astype(np.float64) * 1e300, y=Y)}
    ),
    case("npz-y-2d", NPZ, "labels need shape (samples,)", {"d.npz": npz(x=X, y=Y[:, None])}),
    case("npz-y-fractional", NPZ, "labels must be integer class ids", {"d.npz": npz(x=X, y=Y + 0.5)}),
    case("npz-y-nan", NPZ, "labels must be integer class ids", {"d.npz": npz(x=X, y=np.full(20, np.nan))}),
    case("npz-y-strings", NPZ, "labels must be integer class ids", {"d.npz": npz(x=X, y=Y.astype(str))}),
    case("npz-y-negative", NPZ, "labels must be class ids >= 0", {"d.npz": npz(x=X, y=Y - 1)}),
    case("npz-y-one-class", NPZ, "labels hold a single class", {"d.npz": npz(x=X, y=Y * 0)}),
    case("npz-y-sparse-ids", NPZ, "renumber", {"d.npz": npz(x=X, y=Y * 1_000_000_000)}),
    case("npz-y-object", NPZ, "object arrays", {"d.npz": npz(x=X, y=Y.astype(object))}),
    case("npz-length-mismatch", NPZ, "20 samples in 'x' but 19 labels", {"d.npz": npz(x=X, y=Y[:19])}),
    case(
        "npz-test-shape-mismatch",
        [*NPZ, "data.files.test_path=$dir/t.npz"],
        "has samples of shape (2,)",
        {"d.npz": npz(x=X, y=Y), "t.npz": npz(x=X[:, :2], y=Y)},
    ),
    case(
        "npz-test-unknown-class",
        [*NPZ, "data.files.test_path=$dir/t.npz"],
        "class 5",
        {"d.npz": npz(x=X, y=Y), "t.npz": npz(x=X, y=Y + 4)},
    ),
    case(
        "npz-transfer-shape-mismatch",
        [*NPZ, "data.files.transfer_path=$dir/u.npz"],
        "transfer set",
        {"d.npz": npz(x=X, y=Y), "u.npz": npz(x=X[:, :2])},
    ),
    case(
        "npz-test-fraction-leaves-nothing",
        [*run_files("npz", "$dir/d.npz", "data.files.test_fraction=0.99")],
        "no training samples left",
        {"d.npz": npz(x=X[:2], y=Y[:2])},
    ),
    # csv
    case("csv-missing", CSV, "does not exist"),
    case("csv-empty-file", CSV, "has no header", {"d.csv": ""}),
    case("csv-header-only", CSV, "has no data rows", {"d.csv": "a,b,label\n"}),
    case(
        "csv-ragged-short",
        CSV,
        "line 3 has 2 values; the header has 3 columns",
        {"d.csv": "a,b,label\n1,2,0\n3,1\n4,5,1\n"},
    ),
    case(
        "csv-ragged-long",
        CSV,
        "line 2 has 4 values; the header has 3 columns",
        {"d.csv": "a,b,label\n1,2,0,9\n3,1,1\n"},
    ),
    case("csv-non-numeric", CSV, "line 3, column 'b': 'abc' is not a number", {"d.csv": "a,b,label\n1,2,0\n3,abc,1\n"}),
    case("csv-empty-value", CSV, "line 2, column 'a': an empty value", {"d.csv": "a,b,label\n,2,0\n3,4,1\n"}),
    case("csv-nan-value", CSV, "line 3, column 'b': 'nan'", {"d.csv": "a,b,label\n1,2,0\n3,nan,1\n"}),
    case("csv-inf-value", CSV, "line 2, column 'a': 'inf'", {"d.csv": "a,b,label\ninf,2,0\n3,4,1\n"}),
    case(
        "csv-no-label-column", CSV, "has no label column 'label'; columns: a, b, c", {"d.csv": "a,b,c\n1,2,0\n3,4,1\n"}
    ),
    case("csv-label-fractional", CSV, "labels must be integer class ids", {"d.csv": "a,label\n1,0.5\n2,1\n3,0\n"}),
    case("csv-label-negative", CSV, "labels must be class ids >= 0", {"d.csv": "a,label\n1,-1\n2,1\n3,0\n"}),
    case("csv-only-label-column", CSV, "features", {"d.csv": "label\n0\n1\n0\n1\n"}),
    case("csv-not-utf8", CSV, "is not UTF-8 text", {"d.csv": b"a,label\n\xff\xfe,1\n"}),
    case("csv-binary", CSV, "d.csv", {"d.csv": b"\x00\x01\x02PK\x03\x04"}),
    case("csv-duplicate-columns", CSV, "column 'a' twice", {"d.csv": "a,a,label\n1,2,0\n3,4,1\n"}),
    case(
        "csv-test-columns-differ",
        [*CSV, "data.files.test_path=$dir/t.csv"],
        "t.csv",
        {"d.csv": GOOD_CSV, "t.csv": "a,b,label\n1,2,0\n3,4,1\n"},
    ),
    case(
        "csv-transfer-has-bad-row",
        [*CSV, "data.files.transfer_path=$dir/u.csv"],
        "u.csv' line 3",
        {"d.csv": GOOD_CSV, "u.csv": "a,b,c\n1,2,3\n4,5\n"},
    ),
    case("data-file-unknown-suffix-for-csv", run_files("csv", "$dir/d.txt"), "d.txt", {"d.txt": "hello\n"}),
]
