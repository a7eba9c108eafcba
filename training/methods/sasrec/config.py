"""SASRec's settings: ``training/configs/sasrec.yaml`` read by the one loader (``sasrec.<field>``
overrides; :mod:`training.config` has the rule)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from training.config import load_config

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "sasrec.yaml"
DEVICE_PATTERN = re.compile(r"cpu|auto|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class SASRecConfig:
    """Model and training settings; the defaults reach the reference on Amazon Beauty."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ("max_epochs",)  # what ``max_epochs`` caps

    dim: int = 64
    """Embedding and hidden size D."""
    layers: int = 2
    """Causal self-attention blocks."""
    heads: int = 2
    """Attention heads per block (D must be divisible by it; the paper: 1, see training/configs/sasrec.yaml)."""
    dropout: float = 0.3
    """Dropout on embeddings, attention and feed-forward outputs (dense data; see ``sparse_dropout``)."""
    sparse_dropout: float = 0.5
    """The dropout on sparse data: fewer than ``sparse_below`` training interactions per item
    (:meth:`for_data`; an explicit ``sasrec.dropout`` wins)."""
    sparse_below: float = 30.0
    """Training interactions per item below which the data counts as sparse (0: never)."""
    ffn_mult: int = 1
    """Feed-forward inner width as a multiple of D (1: SASRec's paper, D -> D -> D; 4: the Transformer's and RecBole's)."""
    loss: str = "full"
    """'full': softmax over the whole catalogue; 'sampled': over sampled negatives with log-q correction."""
    negatives: str = "in_batch"
    """Sampled loss only: 'uniform' (num_negatives shared uniform samples) or 'in_batch' (other rows' targets)."""
    num_negatives: int = 256
    """Sampled loss with uniform negatives: negatives per batch."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    batch_size: int = 128
    """Training sequences (chunks of at most T+1 items) per step."""
    max_epochs: int = 200
    """Upper bound on epochs; early stopping usually ends sooner."""
    patience: int = 5
    """Stop after this many epochs without a better validation Recall@20."""
    eval_users: int = 0
    """Validation users used for early stopping (0 = all)."""
    threads: int = 0
    """torch intra-op threads while training (0: torch's default, every core; 1 on a CPU that other
    jobs share); not part of the cache key."""
    max_train_seconds: float = 0.0
    """Stop after the epoch that passes this wall time, keeping the best epoch (0 = no limit); not part of the cache key."""
    device: str = "auto"
    """Where one process trains: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one;
    :func:`training.trainer.training_device`); the trained model comes back on the CPU. Under
    torchrun each rank takes its own GPU when the node has one per rank. Not part of the cache key."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.layers < 1 or self.heads < 1 or self.dim % self.heads or self.ffn_mult < 1:
            raise ValueError(f"need dim, layers, heads, ffn_mult >= 1 and dim % heads == 0, got {self}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.sparse_dropout < 1.0) or self.sparse_below < 0:
            raise ValueError(f"dropouts must be in [0, 1) and sparse_below >= 0, got {self}")
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.negatives not in ("uniform", "in_batch"):
            raise ValueError(f"negatives must be 'uniform' or 'in_batch', got {self.negatives!r}")
        if (
            self.lr <= 0
            or self.batch_size < 1
            or self.max_epochs < 1
            or self.patience < 1
            or self.threads < 0
        ):
            raise ValueError(
                f"need lr > 0, batch_size, max_epochs, patience >= 1 and threads >= 0, got {self}"
            )
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")

    def for_data(self, interactions_per_item: float, explicit_dropout: bool = False) -> SASRecConfig:
        """This config for data with ``interactions_per_item`` training interactions per item:
        ``sparse_dropout`` below ``sparse_below``, unless ``dropout`` was given explicitly."""
        if explicit_dropout or interactions_per_item >= self.sparse_below:
            return self
        return dataclasses.replace(self, dropout=self.sparse_dropout)

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, path: Path = CONFIG_PATH) -> SASRecConfig:
        """The YAML defaults with ``overrides`` applied (``sasrec.<field>``, bare fields, ``max_epochs``)."""
        return load_config(cls, "sasrec", overrides, path)
