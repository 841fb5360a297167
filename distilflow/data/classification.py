"""Classification data: built-in MNIST-1D, or the user's ``.npz`` / ``.csv`` files.

Everything is held in memory as tensors. Distillation may add an unlabeled *transfer set*:
samples the teacher labels with its soft outputs; their hard label is ``IGNORE_INDEX``.

Routing (several teachers, ``data.teacher_column``): an npz array of that name (or a CSV column)
gives each sample's teacher, as an index into ``teachers:`` or as a name (``-1`` / ``''``: no
route). A label-free student (``distill.label_free``) may read a training file without labels
(``x`` alone): its labels are then ``IGNORE_INDEX``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distilflow.config import DataConfig
from distilflow.data.tabular import read_csv_table, read_npz_arrays
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX

NO_ROUTE = -1


@dataclass
class ClassificationData:
    train_x: torch.Tensor  # (N, *input_shape) float32
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    transfer_x: torch.Tensor | None = None  # (M, *input_shape), unlabeled
    train_route: torch.Tensor | None = None  # (N,) int64 teacher index per sample (NO_ROUTE: none), or None
    transfer_route: torch.Tensor | None = None  # (M,)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    @property
    def labelled(self) -> bool:
        """Whether the training samples carry labels (a label-free student's file may hold ``x`` alone)."""
        return bool((self.train_y != IGNORE_INDEX).any())

    def distill_route(self) -> torch.Tensor | None:
        """The route of each sample of :meth:`distill_set` ``(N + M,)``, or None without routing."""
        if self.train_route is None:
            return None
        if self.transfer_x is None or len(self.transfer_x) == 0:
            return self.train_route
        transfer = self.transfer_route
        if transfer is None:
            transfer = torch.full((len(self.transfer_x),), NO_ROUTE, dtype=torch.long)
        return torch.cat([self.train_route, transfer])

    def distill_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Labeled train samples plus the transfer set (labels IGNORE_INDEX)."""
        if self.transfer_x is None or len(self.transfer_x) == 0:
            return self.train_x, self.train_y
        unlabeled = torch.full((len(self.transfer_x),), IGNORE_INDEX, dtype=torch.long)
        return torch.cat([self.train_x, self.transfer_x]), torch.cat([self.train_y, unlabeled])


def _mnist1d_arrays(num_samples: int, train_split: float, seed: int, cache_dir: Path) -> dict:
    """``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads), cached as .npz."""
    key = hashlib.sha256(json.dumps([num_samples, train_split, seed, "v1"]).encode()).hexdigest()[:16]
    path = cache_dir / f"mnist1d-{key}.npz"
    if path.is_file():  # never unpickled: a damaged or foreign file is refused with one line
        return read_npz_arrays(path, ("x", "y", "x_test", "y_test"), f"MNIST-1D cache file '{path}' (data.cache_dir)")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    raw = make_dataset(args)
    arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _as_features(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype == object or not np.issubdtype(x.dtype, np.number):
        raise UserError(f"{where}: features must be numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{where}: features must be real numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise UserError(f"{where}: features need shape (samples, ...), got shape {x.shape}")
    if 0 in x.shape[1:]:
        raise UserError(f"{where}: features have shape {x.shape}; each sample needs at least one feature")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        tensor = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    if not torch.isfinite(tensor).all():
        raise UserError(f"{where}: features hold NaN or inf values (or values beyond float32's range)")
    return tensor


# Labels are class ids 0..C-1 and the model gets C outputs: ids far beyond the classes present are a
# numbering to fix, not a classifier of a billion classes.
SPARSE_LABELS = 1024


def _as_labels(y: np.ndarray, where: str) -> torch.Tensor:
    if y.ndim != 1:
        raise UserError(f"{where}: labels need shape (samples,), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.issubdtype(y.dtype, np.floating) and bool(np.isfinite(y).all()) and bool(np.all(np.mod(y, 1) == 0))
        if not whole:
            raise UserError(f"{where}: labels must be integer class ids 0..C-1, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise UserError(f"{where}: labels must be class ids >= 0, found {int(y.min())}")
    if len(y) and int(y.max()) >= SPARSE_LABELS and int(y.max()) + 1 > 4 * len(np.unique(y)):
        raise UserError(
            f"{where}: labels go up to {int(y.max())} but only {len(np.unique(y))} distinct ids occur; "
            "renumber the classes 0..C-1 (the model gets one output per id up to the largest)"
        )
    return torch.as_tensor(y, dtype=torch.long)


def _as_samples(x: np.ndarray, y: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = _as_features(x, where), _as_labels(y, where)
    if len(features) != len(labels):
        raise UserError(f"{where}: {len(features)} samples in 'x' but {len(labels)} labels in 'y'")
    if len(features) == 0:
        raise UserError(f"{where}: no samples (its arrays have 0 rows)")
    return features, labels


def _read_file(
    path: str, source: str, label_column: str, labeled: bool, route_column: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(x, y, route)`` of an npz or CSV file; ``y`` None when the file has none and ``labeled`` is
    False; ``route`` the ``route_column`` array (None without one)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file '{path}' does not exist")
    where = f"data file '{path}'"
    if source == "npz" or p.suffix == ".npz":
        needed = ("x", "y") if labeled else ("x",)
        optional = ("y",) + ((route_column,) if route_column is not None else ())
        arrays = read_npz_arrays(p, needed, where, optional=optional)
        return arrays["x"], arrays.get("y"), arrays.get(route_column) if route_column is not None else None
    header, table = read_csv_table(p, where)
    route = None
    if route_column is not None and route_column in header:  # teacher indices (-1: none)
        col = header.index(route_column)
        route, table, header = table[:, col], np.delete(table, col, axis=1), header[:col] + header[col + 1 :]
    if label_column in header:
        col = header.index(label_column)
        return np.delete(table, col, axis=1), table[:, col], route
    if labeled:
        raise UserError(f"{where} has no label column '{label_column}'; columns: {', '.join(header)}")
    return table, None, route


def _as_route(values: np.ndarray | None, count: int, teachers: list[str], where: str) -> torch.Tensor | None:
    """Teacher indices ``(count,)`` int64 from an array of indices (-1: none) or names ('': none)."""
    if values is None:
        return None
    if values.shape != (count,):
        raise UserError(f"{where}: the teacher column has shape {values.shape}; it needs one value per sample")
    if values.dtype.kind in "US":
        names = [str(v) for v in values.tolist()]
        unknown = sorted({n for n in names if n and n not in teachers})
        if unknown:
            raise UserError(
                f"{where}: teacher column value {unknown[0]!r} names no teacher (teachers: {', '.join(teachers)})"
            )
        return torch.tensor([teachers.index(n) if n else NO_ROUTE for n in names], dtype=torch.long)
    if values.dtype.kind not in "iuf" or (values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0)):
        raise UserError(f"{where}: the teacher column must hold teacher indices or names, got dtype {values.dtype}")
    route = torch.as_tensor(values.astype(np.int64))
    bad = (route < NO_ROUTE) | (route >= len(teachers))
    if bool(bad.any()):
        raise UserError(
            f"{where}: teacher column value {int(route[bad][0])} names no teacher "
            f"(allowed: 0..{len(teachers) - 1} for {', '.join(teachers)}, or {NO_ROUTE} for none)"
        )
    return route


def _from_factory(spec: str) -> ClassificationData:
    """Your own data: ``module.path:factory`` returns a mapping of arrays (numpy or torch)
    ``x``, ``y``, ``x_test``, ``y_test`` and optionally ``x_transfer`` (unlabeled)."""
    from distilflow.models.build import call_user, import_object

    arrays = call_user(import_object(spec, "data.source"), spec, "data.source")
    if not isinstance(arrays, dict) or not {"x", "y", "x_test", "y_test"} <= set(arrays):
        keys = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise UserError(f"data.source '{spec}' returned {keys}; it must return a dict with x, y, x_test, y_test")
    x, y = _as_samples(np.asarray(arrays["x"]), np.asarray(arrays["y"]), spec)
    tx, ty = _as_samples(np.asarray(arrays["x_test"]), np.asarray(arrays["y_test"]), f"{spec} (test)")
    if tx.shape[1:] != x.shape[1:]:
        raise UserError(
            f"data.source '{spec}': test samples of shape {tuple(tx.shape[1:])}, train {tuple(x.shape[1:])}"
        )
    data = ClassificationData(x, y, tx, ty)
    if arrays.get("x_transfer") is not None:
        data.transfer_x = _as_features(np.asarray(arrays["x_transfer"]), f"{spec} (transfer)")
        if data.transfer_x.shape[1:] != x.shape[1:]:
            raise UserError(f"data.source '{spec}': transfer samples of shape {tuple(data.transfer_x.shape[1:])}")
    return data


def load_classification(
    cfg: DataConfig, *, teachers: list[str] | None = None, labels_needed: bool = True
) -> ClassificationData:
    """The train/test split and optional transfer set described by ``cfg`` (its source's section).

    ``teachers``: the teachers' names, for ``cfg.teacher_column`` (routing); ``labels_needed`` False
    (a label-free student whose teachers are not trained here) lets the training file lack labels."""
    if ":" in cfg.source:
        data = _from_factory(cfg.source)
    elif cfg.source == "mnist1d":
        cache, gen = Path(cfg.cache_dir).expanduser(), cfg.mnist1d
        arrays = _mnist1d_arrays(gen.num_samples, gen.train_split, cfg.seed, cache)
        data = ClassificationData(
            torch.as_tensor(arrays["x"], dtype=torch.float32),
            torch.as_tensor(arrays["y"], dtype=torch.long),
            torch.as_tensor(arrays["x_test"], dtype=torch.float32),
            torch.as_tensor(arrays["y_test"], dtype=torch.long),
        )
        if gen.transfer_size > 0:
            # train_split below 1 keeps make_dataset's split arithmetic; we take both halves.
            extra = _mnist1d_arrays(gen.transfer_size, 0.5, gen.transfer_seed, cache)
            data.transfer_x = torch.as_tensor(np.concatenate([extra["x"], extra["x_test"]]), dtype=torch.float32)
    else:
        files, column, names = cfg.files, cfg.teacher_column, teachers or []
        x, y, route = _read_file(files.path, cfg.source, files.label_column, labels_needed, column)
        unlabelled = y is None
        if unlabelled:  # label-free: the inputs alone (a held-out file must hold the labels that score it)
            if not files.test_path:
                raise UserError(
                    f"data file '{files.path}' holds no labels; give data.files.test_path, a labelled held-out set"
                )
            x = _as_features(x, files.path)
            y = torch.full((len(x),), IGNORE_INDEX, dtype=torch.long)
        else:
            x, y = _as_samples(x, y, files.path)
        if column is not None and route is None:
            raise UserError(f"data file '{files.path}' has no teacher column '{column}' (data.teacher_column)")
        route = _as_route(route, len(x), names, files.path)
        if files.test_path:
            tx, ty, _ = _read_file(files.test_path, cfg.source, files.label_column, True, column)
            tx, ty = _as_samples(tx, ty, files.test_path)
            if not unlabelled and int(ty.max()) > int(y.max()):  # label-free: no trained classes to compare
                raise UserError(
                    f"test data '{files.test_path}' has labels up to class {int(ty.max())}, the training data "
                    f"'{files.path}' only up to class {int(y.max())}; a class never trained on cannot be scored"
                )
        else:
            # A fixed permutation (seeded by data.seed) so the split does not depend on file order.
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
            n_test = max(1, int(round(len(x) * files.test_fraction)))
            tx, ty = x[order[:n_test]], y[order[:n_test]]
            x, y = x[order[n_test:]], y[order[n_test:]]
            route = route[order[n_test:]] if route is not None else None
        if len(x) == 0:
            raise UserError(f"data file '{files.path}': no training samples left after holding out the test split")
        if tx.shape[1:] != x.shape[1:]:
            raise UserError(
                f"test data '{files.test_path}' has samples of shape {tuple(tx.shape[1:])}, "
                f"training data '{files.path}' {tuple(x.shape[1:])}"
            )
        data = ClassificationData(x, y, tx, ty, train_route=route)
        if files.transfer_path:
            ux, _, transfer_route = _read_file(files.transfer_path, cfg.source, files.label_column, False, column)
            ux = _as_features(ux, files.transfer_path)
            data.transfer_route = _as_route(transfer_route, len(ux), names, files.transfer_path)
            if ux.shape[1:] != x.shape[1:]:
                raise UserError(
                    f"transfer set '{files.transfer_path}' has samples of shape {tuple(ux.shape[1:])}, "
                    f"training data {tuple(x.shape[1:])}"
                )
            data.transfer_x = ux
    if data.num_classes < 2:
        raise UserError("data: labels hold a single class; classification needs at least two")
    return data
