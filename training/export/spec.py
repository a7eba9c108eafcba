"""The one bundle spec every method exports through (:func:`training.export.writer.write_bundle`), and
:func:`method_bundle`, which fills in what every trained method shares (items, popularity, data,
item attributes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from models.bundle.attributes import ItemAttributes
from models.index import TreeIndex
from training.data.dataset import Dataset
from training.splits import Split
from training.trainer import popularity_counts


class TrainedOn(Protocol):
    """What :func:`method_bundle` reads of a method's train context (:class:`training.context.TrainContext`)."""

    dataset: Dataset
    split: Split


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle holds besides where it goes: the one argument of :func:`write_bundle`.

    ``encoder``: any module ``(history[B,T], mask[B,T]) -> (memory[B,T,D], query[B,Dr])``;
    ``decoder``: any module with the decoder-step signature. ``item_emb`` [N+1, Dr] must use the
    same Dr as the encoder's ``query``. ``version`` defaults to the UTC creation time.
    ``backends``: None = ONNX, plus the torch files (safetensors + module specs) when the modules
    are kinds :mod:`models.bundle.torch_backend` rebuilds; or an explicit subset of ``("onnx", "torch")``.
    ``item_attributes``: rows for the same N+1 dense ids, written into ``items.npz``; with
    ``content_tower`` the exporter also fits the content tower on them (``content.npz``).
    """

    name: str
    method: str
    encoder: nn.Module
    decoder: nn.Module
    index: TreeIndex
    item_emb: np.ndarray
    item_ids: Sequence[str] | np.ndarray
    popularity: np.ndarray
    score_mode: str
    max_history: int
    metrics: dict[str, Any]
    config: dict[str, Any]
    dataset_fingerprint: str
    version: str | None = None
    backends: Sequence[str] | None = None
    item_attributes: ItemAttributes | None = None
    content_tower: bool = True


def method_bundle(
    ctx: TrainedOn,
    *,
    method: str,
    encoder: nn.Module,
    decoder: nn.Module,
    index: TreeIndex,
    item_emb: np.ndarray,
    score_mode: str,
    config: dict[str, Any],
    max_history: int | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
) -> BundleSpec:
    """The spec of a method trained in ``ctx``: item ids, training popularity, the data set's
    fingerprint and (unless given) the split's history length come from ``ctx``."""
    return BundleSpec(
        name=name or method,
        method=method,
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        item_ids=list(ctx.dataset.vocab.raw_ids),
        popularity=popularity_counts(ctx.split.train, index.num_items),
        score_mode=score_mode,
        max_history=ctx.split.max_len if max_history is None else max_history,
        metrics=dict(metrics or {}),
        config=config,
        dataset_fingerprint=ctx.dataset.fingerprint(),
        item_attributes=dataset_item_attributes(ctx.dataset),
    )


def dataset_item_attributes(ds: Dataset) -> ItemAttributes | None:
    """The data set's item attributes as the bundle stores them (raw attribute ids), or None."""
    if ds.item_attributes is None or ds.num_attributes == 0:
        return None
    names = np.asarray(ds.attribute_names()[1:], dtype=np.str_)  # [A]: attribute id a -> names[a - 1]
    lengths = np.asarray([len(a) for a in ds.item_attributes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [N+2]
    values = np.concatenate([np.asarray(a, dtype=np.int64) for a in ds.item_attributes]) - 1  # [nnz]
    return ItemAttributes.from_arrays(names, offsets, values, rows=ds.num_items + 1)
