"""TDRConfig: ``training/configs/tdr.yaml`` read by the one loader (:mod:`training.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from training.config import load_config
from training.methods.tdr.sampling import RECTIFY_MODES

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "tdr.yaml"
SAMPLERS = ("uniform", "topdown")


@dataclass(frozen=True)
class TDRConfig:
    """Hyper-parameters; ``configs/tdr.yaml`` documents every one and the paper's values."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ("epochs", "round_epochs")  # what ``max_epochs`` caps

    branching: int = 24
    kmeans_iters: int = 20
    dim: int = 24
    windows: tuple[int, ...] = (1, 1, 1, 2, 5)
    attention_hidden: int = 16
    mlp_hidden: tuple[int, ...] = (64, 32)
    init_from_sasrec: bool = True
    sampler: str = "topdown"
    num_negatives: int = 8
    rectify: bool = False
    rectify_mode: str = "hard"
    lr: float = 1e-3
    lr_decay: float = 0.9
    batch_size: int = 256
    epochs: int = 2
    round_epochs: int = 1
    max_train_pairs: int = 0
    tree_rounds: int = 1
    tree_step: int = 1
    tree_pairs_per_item: int = 10
    beam_size: int = 0  # 0 = the catalogue rule (models.search.beam_policy)
    # choose the rerank's path_weight on validation users (training/path_weight.py)
    fuse_path_score: bool = True
    # fuse the beam's choice with the query-to-centroid score, weights chosen on validation users
    # (training/centroid_rule.py)
    fuse_leaf_centroids: bool = False
    rerank: str = "sasrec"
    eval_users: int = 1000
    threads: int = 1

    def __post_init__(self) -> None:
        if self.branching < 2:
            raise ValueError(f"TDRConfig.branching must be >= 2, got {self.branching}")
        for name in ("kmeans_iters", "dim", "attention_hidden", "num_negatives", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TDRConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("round_epochs", "max_train_pairs", "tree_rounds", "eval_users", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"TDRConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.tree_step < 1 or self.tree_pairs_per_item < 1 or self.beam_size < 0:
            raise ValueError(
                "TDRConfig.tree_step, tree_pairs_per_item must be >= 1 and beam_size >= 0, got "
                f"{self.tree_step}, {self.tree_pairs_per_item}, {self.beam_size}"
            )
        if not self.windows or min(self.windows) < 1:
            raise ValueError(f"TDRConfig.windows must be a non-empty list of sizes >= 1, got {self.windows}")
        if not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ValueError(
                f"TDRConfig.mlp_hidden must be a non-empty list of sizes >= 1, got {self.mlp_hidden}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"TDRConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"TDRConfig needs lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")
        if self.rectify_mode not in RECTIFY_MODES:
            raise ValueError(
                f"TDRConfig.rectify_mode must be one of {RECTIFY_MODES}, got {self.rectify_mode!r}"
            )
        if self.rerank != "sasrec":
            raise ValueError(f"TDRConfig.rerank must be 'sasrec', got {self.rerank!r}")

    @property
    def history_window(self) -> int:
        """W: the number of most recent history items the preference model reads."""
        return sum(self.windows)

    @property
    def variant(self) -> str:
        """The paper's name of the variant: TDR(U), TDR(T), TDR(T-RL) (or TDR(U-RL))."""
        rl = ("-RL" if self.rectify_mode == "hard" else "-RL-ratio") if self.rectify else ""
        return f"TDR({'T' if self.sampler == 'topdown' else 'U'}{rl})"

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, path: Path = CONFIG_PATH) -> TDRConfig:
        """The YAML defaults with ``overrides`` applied (the rule of :mod:`training.config`)."""
        return load_config(cls, "tdr", overrides, path)
