"""How a batch of encoder states becomes top-k items: the generative search or the brute-force
baseline (``GENRET_SEARCH_MODE``), behind one interface the compute worker and the shadow executor
both use.

* :class:`GenerativeSearch`: constrained beam search over the bundle's trie (exclusions and
  allow-lists cut its branches), then the rerank of the beam's leaf items
  (:class:`models.retriever.Retriever`); a row left with fewer than k items is filled by exact
  search over what it may return (``Found.filled``). Rows search together only with rows of the
  same beam width.
* :class:`BruteForceSearch`: exact inner-product top-K over the live items
  (:func:`models.bruteforce.bruteforce_topk`; a row with an allow-list over its allowed items);
  the beam width does not matter.

``allow``: per row, the dense ids it may return, or None (any live item). Removed items are never
returned by either.

Each also runs *staged* (:meth:`SearchStrategy.staged`): one stage per call, so the shadow
executor can give way to primary batches between stages; the staged result equals the one-shot one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from models.bruteforce import bruteforce_topk
from models.constraints import fill_rows
from models.retriever import EncoderStates, RetrievalResult
from models.staged_search import StagedSearch
from service.models_registry import LoadedModel


@dataclass(frozen=True)
class Found:
    """The search's answer for a batch of rows."""

    items: np.ndarray  # [b, k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [b, k] float32, -inf where padded
    candidates: list[int]  # [b] items the row's answer was chosen from (after exclusion)
    rerank_s: float = 0.0  # of the search's time, spent scoring the leaf items
    filled: list[int] | None = None  # [b] items of each row from the dense fill (None: none)


Allow = Sequence[np.ndarray | None] | None  # per row: dense ids it may return, or None (any)


class StagedRun(Protocol):
    """One row's search split into stages (:meth:`step` runs the next one)."""

    @property
    def done(self) -> bool: ...
    @property
    def next_stage(self) -> str: ...
    def step(self) -> object: ...
    def found(self) -> Found: ...


class SearchStrategy(Protocol):
    name: str

    def group_beam(self, beam_size: int) -> int:
        """Rows with the same (bundle, group_beam) are searched in one call."""
        ...

    def search(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        ks: Sequence[int] | None = None,
    ) -> Found: ...

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
    ) -> StagedRun: ...


class GenerativeSearch:
    name = "generative"

    def group_beam(self, beam_size: int) -> int:
        return beam_size

    def search(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        ks: Sequence[int] | None = None,
    ) -> Found:
        leaves = model.retriever.beam(states, beam_size, exclude, allow).leaves  # [b, beam]
        t_rerank = time.perf_counter()
        query = states.query.to(model.retriever.device, torch.float32)  # [b, Dr]
        # each row filled up to its own k (a row batched with a larger k is not searched exhaustively)
        result = model.retriever.rerank(leaves, query, k, exclude, allow, fill=True if ks is None else ks)
        return found_of(result, rerank_s=time.perf_counter() - t_rerank)

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
    ) -> StagedRun:
        """Staged (the shadow lane): the same search without the dense fill."""
        return _StagedGenerative(
            model.retriever.staged_search(states, k=k, beam_size=beam_size, exclude=exclude, allow=allow)
        )


def found_of(result: RetrievalResult, rerank_s: float = 0.0, with_fill: bool = True) -> Found:
    """A :class:`models.retriever.RetrievalResult` as the strategy's answer."""
    filled = result.dense_filled if with_fill else None
    return Found(
        items=np.asarray(result.items),  # [b, k]
        scores=np.asarray(result.scores, dtype=np.float32),  # [b, k]
        candidates=[int(c) for c in np.asarray(result.num_candidates)],
        rerank_s=rerank_s,
        filled=None if filled is None else [int(f) for f in filled],
    )


class _StagedGenerative:
    """Each beam-search level, then the rerank (:class:`models.retriever.StagedSearch`)."""

    def __init__(self, search: StagedSearch) -> None:
        self._search = search

    @property
    def done(self) -> bool:
        return self._search.done

    @property
    def next_stage(self) -> str:
        return self._search.next_stage

    def step(self) -> object:
        return self._search.step()

    def found(self) -> Found:
        return found_of(self._search.result(), with_fill=False)


class BruteForceSearch:
    name = "bruteforce"

    def group_beam(self, beam_size: int) -> int:
        return 0  # the beam width plays no part

    def search(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        ks: Sequence[int] | None = None,
    ) -> Found:
        removed = model.removed
        blocked = (
            [np.concatenate([np.asarray(e, np.int64), removed]) for e in exclude] if len(removed) else exclude
        )
        items, scores = bruteforce_topk(states.query, model.item_emb, k, list(blocked))  # [b, k]
        items, scores = np.array(items), np.array(scores, dtype=np.float32)
        candidates = [model.num_live - len(e) for e in exclude]
        if allow is not None:  # an allow-list row: the exact top-k over its allowed items instead
            lookup = model.retriever.lookup
            listed = [a is not None for a in allow]
            items[listed], scores[listed] = 0, -np.inf
            query = states.query.to(model.item_emb.device, torch.float32)  # [b, Dr]
            targets = [k if on else 0 for on in listed]
            fill_rows(
                lookup,
                model.item_emb,
                items,
                scores,
                np.zeros(len(items), np.int64),
                targets,
                query,
                exclude,
                allow,
            )
            for r, a in enumerate(allow):
                if a is not None:
                    candidates[r] = len(lookup.allowed_items(a, exclude[r]))
        return Found(items=items, scores=scores, candidates=candidates)

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
    ) -> StagedRun:
        return _OneStage(lambda: self.search(model, states, k, beam_size, exclude, allow))


class _OneStage:
    """A search with a single stage, ``"bruteforce"``."""

    def __init__(self, run: Callable[[], Found]) -> None:
        self._run = run
        self._found: Found | None = None

    @property
    def done(self) -> bool:
        return self._found is not None

    @property
    def next_stage(self) -> str:
        return "bruteforce"

    def step(self) -> object:
        self._found = self._run()
        return self._found

    def found(self) -> Found:
        if self._found is None:
            raise RuntimeError("the brute-force stage has not run")
        return self._found


STRATEGIES: dict[str, type[GenerativeSearch] | type[BruteForceSearch]] = {
    "generative": GenerativeSearch,
    "bruteforce": BruteForceSearch,
}


def strategy_for(search_mode: str) -> SearchStrategy:
    """The strategy of ``GENRET_SEARCH_MODE`` (``generative`` or ``bruteforce``)."""
    try:
        return STRATEGIES[search_mode]()
    except KeyError:
        raise ValueError(f"unknown search mode {search_mode!r}; known: {sorted(STRATEGIES)}") from None
