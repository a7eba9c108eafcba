"""URI's schedule pieces: training pairs batched by history length, and the per-level stop hook."""

from __future__ import annotations

import math

import numpy as np

from training.methods.uri.config import URIConfig


class PairBatches:
    """Training pairs in length buckets: each batch holds histories of similar length and is cut
    to its longest one (Beauty: mean history 8 of T=50), batches are visited in random order."""

    def __init__(
        self,
        histories: np.ndarray,  # [P, T] left-padded
        targets: np.ndarray,  # [P]
        batch_size: int,
        steps_per_epoch: int,
        rng: np.random.Generator,
    ) -> None:
        self.histories = histories
        self.targets = targets
        self.lengths = (histories > 0).sum(1)  # [P]
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.rng = rng

    def epoch(self) -> list[np.ndarray]:
        order = np.lexsort((self.rng.random(len(self.targets)), self.lengths))  # by length, random ties
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        chunks = [chunks[i] for i in self.rng.permutation(len(chunks))]
        return chunks[: self.steps_per_epoch] if self.steps_per_epoch else chunks

    def history(self, rows: np.ndarray) -> np.ndarray:
        """``rows[B] -> [B, T_b]`` histories cut to the batch's longest (left padding kept)."""
        width = max(1, int(self.lengths[rows].max()))
        return self.histories[rows, -width:]


class LevelConvergence:
    """URI's stop hook for one level (the paper gives no criterion): stop once the relative change of
    the epoch's mean loss is below ``converge_rel_loss`` and the share of items whose argmax token
    changed is below ``converge_token_change``, never before ``level_min_epochs``."""

    def __init__(self, config: URIConfig, tokens: np.ndarray) -> None:
        self.config = config
        self.tokens = tokens  # [N] the items' argmax tokens after the last epoch
        self.loss: float | None = None
        self.rel = math.inf
        self.changed = 1.0

    def observe(self, loss: float, tokens: np.ndarray) -> None:
        """Record an epoch's mean loss and argmax tokens (``rel`` and ``changed`` against the last)."""
        self.changed = float((tokens != self.tokens).mean())
        self.rel = abs(self.loss - loss) / max(abs(self.loss), 1e-12) if self.loss is not None else math.inf
        self.loss, self.tokens = loss, tokens

    def __call__(self, epoch: int, stats: dict[str, float]) -> str | None:
        c = self.config
        if (
            epoch >= c.level_min_epochs
            and self.rel < c.converge_rel_loss
            and self.changed < c.converge_token_change
        ):
            return "converged"
        return None
