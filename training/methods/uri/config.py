"""URIConfig: ``training/configs/uri.yaml`` read by the one loader (:mod:`training.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from training.config import load_config

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "uri.yaml"


@dataclass(frozen=True)
class URIConfig:
    """URI hyper-parameters; ``training/configs/uri.yaml`` documents each choice."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = (
        "level_max_epochs",
        "level_min_epochs",
        "ranker_epochs",
    )  # what ``max_epochs`` caps

    k: int = 32
    """Tokens per level (index width)."""
    levels: int = 2
    """Index depth L; leaves are buckets of items."""
    dim: int = 96
    """Model and representation dimension d (with ``query_encoder: sasrec``: the SASRec width)."""
    query_encoder: str = "own"
    """``own``: a QueryEncoder trained from scratch; ``sasrec``: a copy of the split's SASRec baseline
    (:mod:`training.methods.sasrec.query_encoder`), fine-tuned at ``lr * encoder_lr_scale``."""
    encoder_lr_scale: float = 1.0
    """Learning-rate multiplier of the query encoder (and its item table) in the level stages; 0 freezes it."""
    ranker_encoder_lr_scale: float = 1.0
    """The same multiplier in the final ranker stage."""
    decoder_layers: int = 2
    encoder_layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    max_len: int = 50
    """Most recent history items the query encoder sees."""
    use_attributes: bool = True
    """Add item attribute embeddings to the item encoder when the dataset has attributes."""
    max_attributes: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    steps_per_epoch: int = 0
    """0 = one pass over the training pairs; > 0 caps the steps of an epoch."""
    level_min_epochs: int = 2
    level_max_epochs: int = 6
    converge_rel_loss: float = 0.01
    """A level converges when the epoch loss changes by less than this (relative) ..."""
    converge_token_change: float = 0.02
    """... and fewer than this fraction of items change their argmax token."""
    balance_adaptive: bool = True
    balance_per_parent: bool = True
    """Balance each parent's children (level >= 2) rather than the level as a whole."""
    detach_targets: bool = True
    detach_warmup_epochs: int = 0
    """Epochs at the start of each level with detached targets even when ``detach_targets`` is false."""
    memory_weight: float = 1.0
    commit_weight: float = 1.0
    commit_weight_deeper: float = 1.0
    """Commitment weight at levels >= 2 (see configs/uri.yaml: breaks the uniform fixed point)."""
    balance_weight: float = 1.0
    balance_weight_deeper: float = 1.0
    """Balance weight at levels >= 2."""
    balance_parent_items: int = 64
    """Levels >= 2: random items drawn per parent for its balance term (batch_size / this parents per step)."""
    assign_from: str = "items"
    """``items``: argmax of the item's own P_I under capacity (paper 4.2); ``queries``: of the mean
    P_Q of its training queries blended with P_I (paper 4.1's greedy algorithm, :mod:`.assign`)."""
    evidence_prior: float = 1.0
    """``assign_from: queries``: weight of P_I as pseudo-queries in an item's evidence."""
    warm_start: str = "none"
    """``none``; ``deeper``: levels >= 2 start from balanced k-means inside each parent; ``all``:
    every level does. A warm level trains the decoder on its tokens (memory loss) and moves items by
    query evidence after every epoch (hard EM)."""
    em_levels: int = 99
    """Warm levels ``<= em_levels`` move items by query evidence; deeper ones keep their k-means
    tokens (0: every level keeps them, the control: k-means under URI's decoder)."""
    em_first_epoch: int = 1
    em_accept: str = "always"
    """``always``: every M-step of a warm level stands; ``valid``: undone when it raises the validation users' APE."""
    """Warm levels: items are first reassigned after this epoch (earlier ones fit the decoder to the warm tokens)."""
    num_negatives: int = 10
    hard_negatives: int = 1
    ranker_weight: float = 1.0
    ranker_epochs: int = 3
    beam_size: int = 0  # 0 = the catalogue rule (models.search.beam_policy)
    # choose the rerank's path_weight on validation users (training/path_weight.py)
    fuse_path_score: bool = True
    # fuse the beam's choice with the query-to-centroid score, weights chosen on validation users
    # (training/centroid_rule.py)
    fuse_leaf_centroids: bool = True
    eval_batch_size: int = 256
    threads: int = 1
    """torch intra-op threads while training (0 = torch's default)."""

    def __post_init__(self) -> None:
        positive = (
            "k",
            "levels",
            "dim",
            "decoder_layers",
            "encoder_layers",
            "heads",
            "max_len",
            "batch_size",
            "balance_parent_items",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"URIConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"URIConfig.k must be >= 2, got {self.k}")
        if self.dim % self.heads:
            raise ValueError(f"URIConfig.dim={self.dim} must be divisible by heads={self.heads}")
        if not 1 <= self.level_min_epochs <= self.level_max_epochs:
            raise ValueError(
                f"need 1 <= level_min_epochs <= level_max_epochs, got {self.level_min_epochs}, {self.level_max_epochs}"
            )
        if not 0 <= self.hard_negatives <= self.num_negatives or self.num_negatives < 1:
            raise ValueError(
                f"need 0 <= hard_negatives <= num_negatives and num_negatives >= 1, got "
                f"{self.hard_negatives}, {self.num_negatives}"
            )
        if min(self.ranker_epochs, self.steps_per_epoch, self.detach_warmup_epochs, self.beam_size) < 0:
            raise ValueError("ranker_epochs, steps_per_epoch, detach_warmup_epochs, beam_size must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"URIConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.query_encoder not in ("own", "sasrec"):
            raise ValueError(f"URIConfig.query_encoder must be 'own' or 'sasrec', got {self.query_encoder!r}")
        if self.assign_from not in ("items", "queries"):
            raise ValueError(f"URIConfig.assign_from must be 'items' or 'queries', got {self.assign_from!r}")
        if self.warm_start not in ("none", "deeper", "all"):
            raise ValueError(
                f"URIConfig.warm_start must be 'none', 'deeper' or 'all', got {self.warm_start!r}"
            )
        if self.em_accept not in ("always", "valid"):
            raise ValueError(f"URIConfig.em_accept must be 'always' or 'valid', got {self.em_accept!r}")
        if self.em_levels < 0:
            raise ValueError(f"URIConfig.em_levels must be >= 0, got {self.em_levels}")
        if self.em_first_epoch < 1:
            raise ValueError(f"URIConfig.em_first_epoch must be >= 1, got {self.em_first_epoch}")
        if self.evidence_prior < 0:
            raise ValueError(f"URIConfig.evidence_prior must be >= 0, got {self.evidence_prior}")
        if self.encoder_lr_scale < 0 or self.ranker_encoder_lr_scale < 0:
            raise ValueError(
                "URIConfig.encoder_lr_scale and ranker_encoder_lr_scale must be >= 0, got "
                f"{self.encoder_lr_scale}, {self.ranker_encoder_lr_scale}"
            )

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, path: Path = CONFIG_PATH) -> URIConfig:
        """The YAML defaults with ``overrides`` applied (the rule of :mod:`training.config`)."""
        return load_config(cls, "uri", overrides, path)
