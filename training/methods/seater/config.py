"""SeaterConfig: ``training/configs/seater.yaml`` read by the one loader (:mod:`training.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from training.config import load_config

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "seater.yaml"


@dataclass(frozen=True)
class SeaterConfig:
    """Hyper-parameters; ``configs/seater.yaml`` documents every one and the paper's values."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ("epochs",)  # what ``max_epochs`` caps

    branching: int = 16
    kmeans_iters: int = 10
    dim: int = 64
    layers: int = 1
    heads: int = 2
    ffn_mult: int = 2
    dropout: float = 0.2
    init_from_sasrec: bool = True
    # "own": SEATER's encoder, trained with the decoder; "sasrec": a frozen copy of the split's SASRec
    # (training/methods/sasrec/query_encoder.py) whose states are the decoder's memory; "auto": both,
    # the one served chosen on validation users (training/methods/seater/encoder_choice.py)
    query_encoder: str = "auto"
    align: bool = True
    rank: bool = True
    lambda_align: float = 0.05
    lambda_rank: float = 0.05
    tau: float = 0.1
    beta: float = 0.01
    num_negatives: int = 4
    weight_decay: float = 1e-6
    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 2
    patience: int = 3
    max_train_pairs: int = 0
    beam_size: int = 0  # 0 = the catalogue rule (models.search.beam_policy)
    # choose the rerank's path_weight on validation users (training/path_weight.py)
    fuse_path_score: bool = True
    # fuse the beam's choice with the query-to-centroid score, weights chosen on validation users
    # (training/centroid_rule.py)
    fuse_leaf_centroids: bool = False
    rerank: str = "sasrec"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.branching < 2:
            raise ValueError(f"SeaterConfig.branching must be >= 2, got {self.branching}")
        if self.dim < 1 or self.dim % self.heads != 0:
            raise ValueError(f"SeaterConfig.dim={self.dim} must be >= 1 and divisible by heads={self.heads}")
        if self.beam_size < 0:
            raise ValueError(
                f"SeaterConfig.beam_size must be >= 0 (0 = the catalogue rule), got {self.beam_size}"
            )
        for name in ("layers", "heads", "ffn_mult", "batch_size", "epochs", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"SeaterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"SeaterConfig.threads must be >= 0 (0 = torch default), got {self.threads}")
        if self.num_negatives < 1:
            raise ValueError(f"SeaterConfig.num_negatives must be >= 1, got {self.num_negatives}")
        if self.tau <= 0 or self.lr <= 0:
            raise ValueError(f"SeaterConfig.tau and lr must be > 0, got tau={self.tau}, lr={self.lr}")
        if min(self.lambda_align, self.lambda_rank, self.beta, self.weight_decay) < 0:
            raise ValueError("SeaterConfig.lambda_align, lambda_rank, beta and weight_decay must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SeaterConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.query_encoder not in ("own", "sasrec", "auto"):
            raise ValueError(
                f"SeaterConfig.query_encoder must be 'own', 'sasrec' or 'auto', got {self.query_encoder!r}"
            )
        if self.rerank not in ("sasrec",):
            raise ValueError(f"SeaterConfig.rerank must be 'sasrec', got {self.rerank!r}")

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, path: Path = CONFIG_PATH) -> SeaterConfig:
        """The YAML defaults with ``overrides`` applied (the rule of :mod:`training.config`)."""
        return load_config(cls, "seater", overrides, path)
