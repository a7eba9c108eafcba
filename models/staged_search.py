"""One :meth:`models.retriever.Retriever.search` in stages: each beam-search level, then the rerank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from models.retrieval_types import EncoderStates, RetrievalResult, check_search_args
from models.search import BeamState, beam_finish, beam_step

if TYPE_CHECKING:
    from models.retriever import Retriever


class StagedSearch:
    """One :meth:`Retriever.search` split into stages: each beam-search level, then the rerank.

    Each :meth:`step` runs one stage and returns its name (``"level1"`` .. ``"levelL"``,
    ``"rerank"``); between two steps the caller may run other work (the service's shadow lane gives
    way to primary batches there). The stages are the one-shot search's
    (:func:`models.search.beam_step` is the body of :func:`beam_search`'s loop), so the result is
    the same. Not thread-safe: one caller steps it at a time (any thread).
    """

    def __init__(
        self,
        retriever: Retriever,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        check_search_args(k, beam_size)
        self._retriever = retriever
        self._k = k
        self._exclude = exclude
        self._allow = allow
        memory, memory_mask, self._query = retriever._on_device(states)  # [B,T,D], [B,T], [B,Dr]
        self._scorer = retriever._scorer(memory, memory_mask)
        self._beam: BeamState = retriever.beam_begin(states.batch_size, beam_size, exclude, allow)
        self._result: RetrievalResult | None = None

    @property
    def num_stages(self) -> int:
        """Beam-search levels + the rerank."""
        return self._retriever.trie.levels + 1

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def next_stage(self) -> str:
        """The name of the stage :meth:`step` runs next (``"done"`` when none is left)."""
        if self._result is not None:
            return "done"
        depth = self._beam.depth
        return f"level{depth + 1}" if depth < self._retriever.trie.levels else "rerank"

    def step(self) -> str:
        """Run the next stage; returns its name."""
        trie = self._retriever.trie
        if self._result is not None:
            raise RuntimeError("the staged search is already done")
        if not self._beam.done(trie):
            self._beam = beam_step(trie, self._scorer, self._beam)
            return f"level{self._beam.depth}"
        beam = beam_finish(trie, self._beam)
        self._result = self._retriever.rerank(beam.leaves, self._query, self._k, self._exclude, self._allow)
        return "rerank"

    def run(self) -> RetrievalResult:
        """The remaining stages in one go."""
        while self._result is None:
            self.step()
        return self._result

    def result(self) -> RetrievalResult:
        if self._result is None:
            raise RuntimeError("the staged search is not done: call step() until done")
        return self._result
