"""The query encoder: a user's item history -> encoder states (``memory`` for the decoder's
cross-attention, ``query`` for the inner-product rerank).

``encoder.onnx`` is this module exported: ``(history[B,T] int64, history_mask[B,T] bool) ->
(memory[B,T,D], query[B,Dr])``.

Histories are dense item ids, ``0`` = padding, and may be padded on either side. Positions are
counted from the most recent item (the newest valid item has position 0), so a left-padded
history gives the same states whatever the padded length ``T`` is.

Trainers compose rather than fork: the item embedding is injectable (any module mapping
``[B,T] int64 -> [B,T,D]``; URI passes one that adds item attributes, SEATER can share the
table with its decoder), and :meth:`QueryEncoder.embed_items` can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Pooling = Literal["last", "mean"]


def layer_options(dim: int, num_heads: int, ff_mult: int, dropout: float) -> dict[str, Any]:
    """Keyword arguments shared by every Transformer layer of the encoder and decoder:
    pre-norm, GELU, batch first (the exported graphs and the parity tests assume these)."""
    return {
        "d_model": dim,
        "nhead": num_heads,
        "dim_feedforward": ff_mult * dim,
        "dropout": dropout,
        "activation": "gelu",
        "batch_first": True,
        "norm_first": True,
    }


@dataclass(frozen=True)
class EncoderConfig:
    num_items: int
    """N: the item embedding table has N+1 rows, row 0 = padding."""
    dim: int = 64
    """D: width of the Transformer and of ``memory``."""
    num_layers: int = 2
    num_heads: int = 2
    ff_mult: int = 4
    """Feed-forward width = ``ff_mult * dim``."""
    max_len: int = 50
    """Number of learned positions; older items beyond this share the last position."""
    dropout: float = 0.1
    causal: bool = False
    """True: position t attends to t and older items only (SASRec); False: bidirectional."""
    pooling: Pooling = "last"
    """How ``query`` is read from ``memory``: the most recent valid position, or the masked mean."""
    query_dim: int | None = None
    """Dr: width of ``query``. None = D without projection; otherwise a linear projection."""

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"EncoderConfig.num_items must be >= 1, got {self.num_items}")
        if self.dim < 1 or self.dim % self.num_heads != 0:
            raise ValueError(
                f"EncoderConfig.dim={self.dim} must be >= 1 and divisible by num_heads={self.num_heads}"
            )
        if self.num_layers < 1 or self.max_len < 1 or self.ff_mult < 1:
            raise ValueError(
                f"EncoderConfig needs num_layers, max_len, ff_mult >= 1, got "
                f"{self.num_layers}, {self.max_len}, {self.ff_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"EncoderConfig.pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.query_dim is not None and self.query_dim < 1:
            raise ValueError(f"EncoderConfig.query_dim must be >= 1 or None, got {self.query_dim}")


def attention_mask(mask: Tensor, causal: bool) -> Tensor:
    """Which keys each position may attend to: ``[B,T] valid -> [B,T,T]`` bool, True = blocked.

    Every position may always attend to itself, so no row is fully blocked (a fully blocked row
    gives NaN in softmax, and NaN leaks through zero attention weights into valid positions).
    """
    T = mask.shape[1]
    allowed = mask[:, None, :].expand(-1, T, -1)  # [B, T(query), T(key)]
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)[None]  # [1, T, T]
    if causal:
        # position t holds an older item than t+1 (time order), so "causal" = keys at <= t
        older = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()[None]
        allowed = allowed & older
    return ~(allowed | eye)


def recency_positions(mask: Tensor) -> Tensor:
    """Position of each valid item counted from the most recent one: ``[B,T] bool -> [B,T] int64``.

    The newest valid item is 0, the one before it 1, ...; padding gets 0 (its embedding is masked).
    """
    valid = mask.long()  # [B, T]
    after = valid.sum(dim=1, keepdim=True) - valid.cumsum(dim=1)  # valid items strictly after t
    return after * valid


class QueryEncoder(nn.Module):
    """Transformer over the history -> ``(memory[B,T,D], query[B,Dr])``.

    ``item_embedding``: optional module ``[B,T] int64 -> [B,T,D]`` replacing the default
    ``nn.Embedding(N+1, D, padding_idx=0)`` (e.g. one shared with a decoder or adding attributes).
    """

    def __init__(self, config: EncoderConfig, item_embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        self.item_embedding = (
            item_embedding
            if item_embedding is not None
            else nn.Embedding(config.num_items + 1, D, padding_idx=0)
        )
        self.position_embedding = nn.Embedding(config.max_len, D)
        self.input_norm = nn.LayerNorm(D)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            **layer_options(D, config.num_heads, config.ff_mult, config.dropout)
        )
        self.layers = nn.TransformerEncoder(layer, num_layers=config.num_layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(D)
        self.query_projection: nn.Module = (
            nn.Identity() if config.query_dim is None else nn.Linear(D, config.query_dim)
        )

    def embed_items(self, history: Tensor) -> Tensor:
        """``[B,T] int64 -> [B,T,D]``; override or inject to add item-side features."""
        return self.item_embedding(history)

    def forward(self, history: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``history[B,T] int64, history_mask[B,T] bool -> memory[B,T,D], query[B,Dr]``."""
        mask = history_mask.bool() & (history > 0)  # [B, T]
        positions = recency_positions(mask).clamp(max=self.config.max_len - 1)  # [B, T]
        x = self.embed_items(history) + self.position_embedding(positions)  # [B, T, D]
        x = self.dropout(self.input_norm(x)) * mask[..., None]
        blocked = attention_mask(mask, self.config.causal)  # [B, T, T]
        blocked = blocked.repeat_interleave(self.config.num_heads, dim=0)  # [B*H, T, T]
        memory = self.output_norm(self.layers(x, mask=blocked))  # [B, T, D]
        return memory, self.query_projection(self.pool(memory, mask))

    def pool(self, memory: Tensor, mask: Tensor) -> Tensor:
        """``memory[B,T,D], mask[B,T] -> [B,D]``: most recent valid position, or masked mean.

        An empty history pools to the zero vector.
        """
        weights = mask.to(memory.dtype)  # [B, T]
        if self.config.pooling == "last":
            positions = torch.arange(mask.shape[1], device=mask.device)[None]  # [1, T]
            last = torch.where(mask, positions, -1).amax(dim=1)  # [B], -1 when empty
            weights = (positions == last[:, None]).to(memory.dtype)  # [B, T] one-hot (or zeros)
        else:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return torch.bmm(weights[:, None, :], memory)[:, 0]  # [B, D]
