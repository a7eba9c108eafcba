"""The beam search in stages, the one loop every search runs.

A :class:`StagedSearch` holds a beam at the root (:func:`models.search.beam.beam_start`), runs one
:func:`models.search.beam.beam_step` per level, then one final stage on the finished beam (the
rerank of :meth:`models.search.retriever.Retriever.search`, the static rerank the CUDA graphs
capture, or nothing for the leaves alone). :meth:`StagedSearch.run` runs the stages in one go,
and :func:`beam_search` is that for the leaves; a caller that steps it may run other work between
two stages (the service's shadow lane gives way to primary batches there). So the one-shot search,
the staged search and the graphed search are the same stages, and the parity tests hold the
callers to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

from models.search.beam import (
    BeamResult,
    BeamState,
    DeviceTrie,
    NodeKeys,
    ScoreMode,
    Scorer,
    StepScorer,
    beam_finish,
    beam_start,
    beam_step,
)

Result = TypeVar("Result")


class StagedSearch(Generic[Result]):
    """Each beam-search level, then ``finish`` on the finished beam.

    Each :meth:`step` runs one stage and returns its name (``"level1"`` .. ``"levelL"``, then
    ``final_stage``). Not thread-safe: one caller steps it at a time (any thread).
    """

    def __init__(
        self,
        trie: DeviceTrie,
        scorer: Scorer | StepScorer,
        beam: BeamState,
        finish: Callable[[BeamResult], Result],
        final_stage: str = "rerank",
    ) -> None:
        self._trie = trie
        self._scorer = scorer
        self._beam = beam
        self._finish = finish
        self._final_stage = final_stage
        self._done = False
        self._result: Result | None = None

    @property
    def num_stages(self) -> int:
        """Beam-search levels + the final stage."""
        return self._trie.levels + 1

    @property
    def done(self) -> bool:
        return self._done

    @property
    def next_stage(self) -> str:
        """The name of the stage :meth:`step` runs next (``"done"`` when none is left)."""
        if self._done:
            return "done"
        depth = self._beam.depth
        return f"level{depth + 1}" if depth < self._trie.levels else self._final_stage

    def step(self) -> str:
        """Run the next stage; returns its name."""
        if self._done:
            raise RuntimeError("the staged search is already done")
        if not self._beam.done(self._trie):
            self._beam = beam_step(self._trie, self._scorer, self._beam)
            return f"level{self._beam.depth}"
        self._result = self._finish(beam_finish(self._trie, self._beam))
        self._done = True
        return self._final_stage

    def run(self) -> Result:
        """The remaining stages in one go."""
        while not self._done:
            self.step()
        return self.result()

    def result(self) -> Result:
        if not self._done:
            raise RuntimeError("the staged search is not done: call step() until done")
        return self._result  # type: ignore[return-value]  # set by the final stage


def beam_search(
    trie: DeviceTrie,
    scorer: Scorer | StepScorer,
    batch_size: int,
    beam_size: int,
    score_mode: ScoreMode,
    exclude_nodes: Tensor | None = None,
    node_keys: NodeKeys | None = None,
) -> BeamResult:
    """Find the ``beam_size`` best leaves of each of ``batch_size`` queries: the stages of a
    :class:`StagedSearch` with no final work.

    ``exclude_nodes``: boolean ``[num_nodes]`` (same for all queries) or ``[B, num_nodes]``; an
    excluded node is never expanded nor returned (its subtree is cut); ``node_keys`` does the same
    per row (:class:`models.search.beam.NodeKeys`).
    """
    state = beam_start(trie, batch_size, beam_size, score_mode, exclude_nodes, node_keys)
    return StagedSearch(trie, scorer, state, finish=lambda found: found, final_stage="leaves").run()
