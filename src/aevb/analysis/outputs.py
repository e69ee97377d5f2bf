"""Results out of a run as data files: the codes of a data set (``aevb encode``), samples (``aevb sample
--format``) and a table's reconstructions (``aevb reconstruct``).

Tables (``.csv``, and ``.parquet`` where pyarrow is installed) have a header;
``.npy`` files hold one array: samples [n, *data_shape], or the codes as a
structured array with the fields ``mean`` [D], ``sigma`` [D] and, where the
data have labels, ``label`` (``np.load(path)["mean"]``).  A tabular run's
samples and reconstructions are in the units of its file (the standardisation inverted), under
the CSV header's column names.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from aevb.data.datasets import Dataset, read_examples
from aevb.errors import UserError
from aevb.io import write_text
from aevb.model.base import Model
from aevb.run.data import held_out
from aevb.run.open import Run
from aevb.sampling.codes import codes

TABLE_SUFFIXES = (".csv", ".parquet")
SPLITS = ("train", "val", "test")


def encode_run(run: Run, out: str | Path, *, data: str | None = None, labels: str | None = None,
               split: str = "test", batch_size: int = 1000) -> Path:
    """Write the codes of a run's data to ``out`` (.npy, .csv, .parquet): the posterior mean and σ of each
    example, and its label where there are labels.

    ``data``: a data file or image folder of the kind the run was trained on (every example of it, prepared
    as in training: a table standardised with the run's training statistics); else the run's ``split``.
    """
    out = _output(out, (".npy", *TABLE_SUFFIXES))
    if data is None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        x, y = run.held_out(split)
        if x is None or not len(x):
            raise UserError(f"{run.path} has no {split} split; choose another with --split or pass --data")
    else:
        x, y = held_out(_new_data(run.dataset, data, labels, run.config.image_size), run.config, "test")
    run.check_data_shape(x)
    mean, sigma = codes(run.model, x, batch_size, conditioning_labels(run.model, y, "aevb encode"))
    latent = mean.shape[1]
    if out.suffix == ".npy":
        fields = [("mean", "f4", (latent,)), ("sigma", "f4", (latent,))] + ([("label", "i8")] if y is not None else [])
        table = np.zeros(len(mean), dtype=fields)
        table["mean"], table["sigma"] = mean.numpy(), sigma.numpy()
        if y is not None:
            table["label"] = y.numpy()
        np.save(out, table)
        return out
    columns = [f"mu{d + 1}" for d in range(latent)] + [f"sigma{d + 1}" for d in range(latent)]
    values = [*mean.T.tolist(), *sigma.T.tolist()]
    if y is not None:
        columns, values = columns + ["label"], values + [y.tolist()]
    return write_table(out, columns, values)


def conditioning_labels(model: Model, labels: torch.Tensor | None, command: str) -> torch.Tensor | None:
    """The labels [N] a conditional model is given with its examples (None for another model); a UserError where
    a conditional model's examples have none."""
    if not model.conditional:
        return None
    if labels is None:
        raise UserError(f"{command}: the model is conditional on class labels, and these examples have none; pass "
                        f"data with labels (--labels FILE with --data FILE, or an image folder of class subfolders)")
    return labels


def samples_in_units(run: Run, samples: torch.Tensor) -> torch.Tensor:
    """Samples [n, *data_shape] in the units of the run's data: a table's standardisation inverted."""
    return run.dataset.original_units(samples) if run.dataset.kind == "tabular" else samples


def write_samples(run: Run, samples: torch.Tensor, out: str | Path) -> Path:
    """Samples [n, *data_shape] to ``out``: .npy (any data; a table in its original units) or a table's
    .csv/.parquet (rows under its column names)."""
    out = _output(out, (".npy", *TABLE_SUFFIXES))
    values = samples_in_units(run, samples.cpu())
    if out.suffix == ".npy":
        np.save(out, values.numpy())
        return out
    if run.dataset.kind != "tabular":
        raise UserError(f"{run.path} models images, which a table does not hold; write them with --format png or npy")
    return write_table(out, run.dataset.column_names(), values.T.tolist())


def write_reconstructions(run: Run, x: torch.Tensor, out: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Rows x [n, D] of a table and their reconstructions, both in the units of its file, to ``out``: a .csv or
    .parquet of the columns NAME and NAME_reconstructed, or a .npy array [2, n, D] (rows, reconstructions).
    ``labels`` [n]: the rows' classes, for a conditional model."""
    out = _output(out, (".npy", *TABLE_SUFFIXES))
    with torch.no_grad():
        y = None if labels is None else labels.to(run.model.device)
        reconstructed = run.model.reconstruct(x.to(run.model.device), y).cpu()
    rows, reconstructed = run.dataset.original_units(x.cpu()), run.dataset.original_units(reconstructed)
    if out.suffix == ".npy":
        np.save(out, torch.stack([rows, reconstructed]).numpy())
        return out
    names = run.dataset.column_names()
    return write_table(out, [*names, *(f"{name}_reconstructed" for name in names)],
                       [*rows.T.tolist(), *reconstructed.T.tolist()])


def write_table(out: Path, columns: Sequence[str], values: Sequence[Sequence]) -> Path:
    """Columns ``values[j]`` named ``columns[j]`` as a .csv file (or .parquet, with pyarrow)."""
    if out.suffix == ".parquet":
        try:  # optional, and heavy: imported only to write parquet
            pyarrow = importlib.import_module("pyarrow")
            parquet = importlib.import_module("pyarrow.parquet")
        except ImportError:
            raise UserError(f"writing {out.name} needs the pyarrow package (pip install pyarrow); or write "
                            f"{out.with_suffix('.csv').name}") from None
        parquet.write_table(pyarrow.table(dict(zip(columns, values))), out)
        return out
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*values))
    write_text(out, buffer.getvalue())
    return out


def _output(out: str | Path, suffixes: tuple[str, ...]) -> Path:
    out = Path(out)
    if out.suffix not in suffixes:
        raise UserError(f"cannot write {out}: give it one of the suffixes {', '.join(suffixes)}")
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a folder; pass a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _new_data(trained_on: Dataset, path: str, labels: str | None, image_size: int | None) -> Dataset:
    """``trained_on`` with every example of the file or folder ``path`` as its test split, prepared as the run's
    data were: a table standardised with the run's training statistics, not its own."""
    new = read_examples(path, labels, image_size)
    if new.kind != trained_on.kind:
        raise UserError(f"{path} holds {'images' if new.kind == 'image' else 'a table'}, but the run was trained on "
                        f"{'images' if trained_on.kind == 'image' else 'a table'}; pass data of its kind")
    return dataclasses.replace(trained_on, test=trained_on.standardized(new.x), test_labels=new.y)
