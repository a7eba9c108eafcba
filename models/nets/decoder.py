"""The decoder step, one signature for every method (docs/CONTRACTS.md "models/ (torch modules) and backends").

``(memory[B,T,D], memory_mask[B,T], beam_query[Bb], prefix[Bb,S], candidates[Bb,C]) -> scores[Bb,C]``
is the reference form (``forward``: the whole prefix, any ``beam_query``); serving runs the
incremental form of :mod:`models.nets.decoder_step` (``TokenDecoder.memory_state`` once per batch,
then ``TokenDecoder.step`` per level: cached prefix keys/values, beams grouped by query), which
``decoder_memory.onnx`` and ``decoder.onnx`` are exported from and which is held to ``forward``.

* ``beam_query[i]`` is the row of ``memory`` beam ``i`` belongs to (memory is never repeated).
* ``prefix`` holds global node ids, root first, so ``prefix[:, s]`` is a node of level ``s`` and
  the candidates are nodes of level ``S``; ``candidates == -1`` is padding.
* Padded candidates score :data:`PAD_SCORE`, a large *finite* negative number rather than -inf:
  ONNX Runtime and log-softmax stay NaN-free even when every candidate of a beam is padding,
  and ``exp(PAD_SCORE - real)`` is exactly 0 in float32, so a padded candidate never takes mass.

:class:`TokenDecoder` (URI, SEATER) scores ``h · E[token(candidate)] + bias`` with ``h`` the last
hidden state of a Transformer decoder over the prefix; :class:`NodeScorer` (TDR) scores
``MLP(user, node)`` and ignores the prefix. The backends and the exporter accept any
``nn.Module`` with this forward signature (:class:`models.nets.decoder_step.DecoderStep` serves a
module without a ``step`` statelessly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.nets.decoder_step import (
    cached_self_attention,
    grouped_cross_attention,
    key_bias,
    memory_keys_values,
    take,
)
from models.nets.encoder import layer_options

TokenScheme = Literal["level", "node"]

PAD_SCORE = -1.0e9
"""Score of a padded candidate (``candidates == -1``)."""


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 64
    """D: must equal the encoder's memory width."""
    num_layers: int = 2
    num_heads: int = 2
    ff_mult: int = 4
    dropout: float = 0.1
    token_scheme: TokenScheme = "level"
    """``level``: one embedding per (level, level-local token) (URI); ``node``: one per global node (SEATER, TDR)."""
    use_bias: bool = True
    """Add a learned per-token bias to the scores."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.dim % self.num_heads != 0:
            raise ValueError(
                f"DecoderConfig.dim={self.dim} must be >= 1 and divisible by num_heads={self.num_heads}"
            )
        if self.num_layers < 1 or self.ff_mult < 1:
            raise ValueError(
                f"DecoderConfig needs num_layers, ff_mult >= 1, got {self.num_layers}, {self.ff_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DecoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.token_scheme not in ("level", "node"):
            raise ValueError(
                f"DecoderConfig.token_scheme must be 'level' or 'node', got {self.token_scheme!r}"
            )


def node_levels(level_offsets: np.ndarray) -> np.ndarray:
    """``level_offsets[L+2] -> [num_nodes]`` int64: the level of every global node (root = 0)."""
    offsets = np.asarray(level_offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def token_rows(node_token: np.ndarray, level_offsets: np.ndarray, token_scheme: TokenScheme) -> np.ndarray:
    """The row of the token embedding table of every global node: ``[num_nodes]`` int64.

    ``node``: ``node_token`` itself (the global node id). ``level``: ``level * V + node_token``
    with ``V = max(node_token) + 1``, so tokens are shared across parents but not across levels.
    """
    tokens = np.asarray(node_token, dtype=np.int64)
    levels = node_levels(level_offsets)
    if tokens.shape != levels.shape:
        raise ValueError(
            f"node_token has {tokens.shape[0]} nodes but level_offsets describe {levels.shape[0]}"
        )
    if token_scheme == "node":
        return tokens
    return levels * (int(tokens.max()) + 1) + tokens


def safe_key_padding(memory_mask: Tensor) -> Tensor:
    """``[Bb,T] valid -> [Bb,T]`` True = ignore. A row with no valid key (empty history) attends
    to its last position only instead of producing NaN: with left padding that is the slot of the
    newest item, so the result does not depend on how far the row was padded."""
    valid = memory_mask.bool()
    empty = ~valid.any(dim=1, keepdim=True)  # [Bb, 1]
    T = valid.shape[1]
    last = torch.arange(T, device=valid.device)[None, :] == T - 1  # [1, T]
    return ~(valid | (empty & last))


def shared_memory_attention(
    attn: nn.MultiheadAttention, x: Tensor, memory: Tensor, blocked: Tensor, beam_query: Tensor
) -> Tensor:
    """Cross-attention of beams over their query's memory, keys/values projected per query row.

    ``x[Bb,S,D], memory[B,T,D], blocked[B,T] (True = ignore), beam_query[Bb] -> [Bb,S,D]``;
    the same result as ``attn(x, memory[beam_query], memory[beam_query], key_padding_mask=...)``.
    """
    Bb, S, D = x.shape
    B, T, _ = memory.shape
    H = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # [D, D] each
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = F.linear(x, w_q, b_q).reshape(Bb, S, H, D // H).transpose(1, 2)  # [Bb, H, S, hd]
    k = F.linear(memory, w_k, b_k).reshape(B, T, H, D // H).transpose(1, 2)[beam_query]  # [Bb, H, T, hd]
    v = F.linear(memory, w_v, b_v).reshape(B, T, H, D // H).transpose(1, 2)[beam_query]  # [Bb, H, T, hd]
    allowed = ~blocked[beam_query][:, None, None, :]  # [Bb, 1, 1, T]
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)  # [Bb, H, S, hd]
    return attn.out_proj(out.transpose(1, 2).reshape(Bb, S, D))


def decoder_layer(
    layer: nn.TransformerDecoderLayer,
    x: Tensor,
    memory: Tensor,
    blocked: Tensor,
    beam_query: Tensor,
    causal: Tensor,
) -> Tensor:
    """One pre-norm ``nn.TransformerDecoderLayer`` with :func:`shared_memory_attention`: ``[Bb,S,D] -> [Bb,S,D]``."""
    if not layer.norm_first:
        raise ValueError("decoder_layer implements norm_first=True layers only")
    h = layer.norm1(x)
    x = x + layer.dropout1(layer.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0])
    x = x + layer.dropout2(
        shared_memory_attention(layer.multihead_attn, layer.norm2(x), memory, blocked, beam_query)
    )
    h = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x)))))
    return x + layer.dropout3(h)


def gather_candidates(node_row: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """``candidates[Bb,C]`` (-1 = pad) -> (embedding rows [Bb,C], pad mask [Bb,C])."""
    pad = candidates < 0
    return node_row[candidates.clamp(min=0)], pad


class TokenDecoder(nn.Module):
    """Transformer decoder over the prefix with cross-attention to the encoder memory.

    ``node_token`` / ``level_offsets``: the index's arrays (fixed at construction, stored as a
    buffer mapping every node to its token-embedding row). ``token_embedding``: optional module
    ``rows[...] int64 -> [..., D]`` used both to embed the prefix and as the output table (pass
    one that reads leaf rows from the item table to tie leaves to items, as SEATER does); rows are
    numbered as :func:`token_rows` says, and :attr:`num_rows` tells how many there are.
    """

    def __init__(
        self,
        config: DecoderConfig,
        node_token: np.ndarray,
        level_offsets: np.ndarray,
        token_embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        rows = token_rows(node_token, level_offsets, config.token_scheme)
        self.num_rows = int(rows.max()) + 1
        self.level_vocab = int(np.asarray(node_token).max()) + 1  # V: rows per level (level tokens)
        self.cache_width = config.num_layers * 2 * D  # W of the incremental step's cache
        self.state_count = config.num_layers * 2  # tensors of the memory state (cross keys, values)
        # the step's score column of candidate c at index c+1 (index 0: padding, c = -1): the
        # level-local token (level tokens: a column of the level's [Bb, V] product), else the row
        column = (
            rows - node_levels(level_offsets) * self.level_vocab if config.token_scheme == "level" else rows
        )
        self.score_column: Tensor
        self.register_buffer(
            "score_column", torch.from_numpy(np.concatenate([[0], column])), persistent=False
        )
        self.max_depth = len(level_offsets) - 1  # L + 1 prefix positions (root .. leaf)
        self.node_row: Tensor
        self.register_buffer("node_row", torch.from_numpy(rows), persistent=False)
        self.token_embedding = (
            token_embedding if token_embedding is not None else nn.Embedding(self.num_rows, D)
        )
        self.level_embedding = nn.Embedding(self.max_depth, D)
        self.bias = nn.Parameter(torch.zeros(self.num_rows)) if config.use_bias else None
        layer = nn.TransformerDecoderLayer(
            **layer_options(D, config.num_heads, config.ff_mult, config.dropout)
        )
        self.layers = nn.TransformerDecoder(layer, num_layers=config.num_layers)
        self.output_norm = nn.LayerNorm(D)

    def hidden(self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor) -> Tensor:
        """``memory[B,T,D], memory_mask[B,T], beam_query[Bb], prefix[Bb,S] -> h[Bb,D]`` (last position).

        Computes exactly ``self.layers(x, memory[beam_query], tgt_mask=causal,
        memory_key_padding_mask=...)`` (the nn.TransformerDecoder the trainers call), but projects
        the cross-attention keys/values once per query row instead of once per beam.
        """
        S = prefix.shape[1]
        positions = torch.arange(S, device=prefix.device)  # [S] == level of prefix[:, s]
        x = self.token_embedding(self.node_row[prefix]) + self.level_embedding(positions)[None]  # [Bb, S, D]
        causal = torch.ones(S, S, dtype=torch.bool, device=prefix.device).triu(
            diagonal=1
        )  # [S, S] True = blocked
        blocked = safe_key_padding(memory_mask)  # [B, T]
        for layer in self.layers.layers:
            x = decoder_layer(layer, x, memory, blocked, beam_query, causal)  # [Bb, S, D]
        if self.layers.norm is not None:
            x = self.layers.norm(x)
        return self.output_norm(x[:, -1])  # [Bb, D]

    def score_hidden(self, h: Tensor, candidates: Tensor) -> Tensor:
        """``h[Bb,D], candidates[Bb,C] -> scores[Bb,C]`` (PAD_SCORE where candidates == -1)."""
        rows, pad = gather_candidates(self.node_row, candidates)  # [Bb, C]
        scores = torch.bmm(self.token_embedding(rows), h[:, :, None])[:, :, 0]  # [Bb, C]
        if self.bias is not None:
            scores = scores + self.bias[rows]
        return scores.masked_fill(pad, PAD_SCORE)

    def forward(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        """The reference step: the whole prefix, any ``beam_query`` (the trainers' form)."""
        return self.score_hidden(self.hidden(memory, memory_mask, beam_query, prefix), candidates)

    def memory_state(self, memory: Tensor) -> tuple[Tensor, ...]:
        """``memory[B,T,D] ->`` every layer's cross-attention keys and values, once per batch:
        ``2 * num_layers`` tensors ``[B,D,T]`` ordered ``[layer, (key, value)]``."""
        return tuple(
            t for layer in self.layers.layers for t in memory_keys_values(layer.multihead_attn, memory)
        )

    def step(
        self,
        memory_state: tuple[Tensor, ...],
        memory_mask: Tensor,
        beam_query: Tensor,
        prefix: Tensor,
        candidates: Tensor,
        cache: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The serving step (:mod:`models.nets.decoder_step`), eval mode only (no dropout).

        ``memory_state`` is :meth:`memory_state` of the batch's memory. ``cache[Bb,S-1,W]``
        holds the self-attention keys|values of prefix positions ``0..S-2``; only the last position
        is computed: ``-> (scores[Bb,C], cache_out[Bb,1,W])``. Beams must be grouped by query
        (``Bb = B*w``, ``beam_query[i] = i // w``), as the search passes them.
        """
        S, D = prefix.shape[1], self.config.dim
        if cache.shape[1] != S - 1:
            raise ValueError(f"step wants a cache of S-1={S - 1} positions, got {tuple(cache.shape)}")
        node = take(self.node_row, prefix[:, -1])  # [Bb] token row of the new position
        # the level of the new position; clamped only so that the exporter may trace a prefix longer
        # than a shallow tree's (a real prefix never reaches the clamp)
        level = torch.full((1,), S - 1, device=prefix.device).clamp(max=self.max_depth - 1)  # [1]
        x = self.token_embedding(node) + self.level_embedding(level)  # [Bb, D]
        cross_bias = key_bias(memory_mask, x.dtype)  # [B, 1, 1, T] 0 = attend, -inf = blocked
        # the cache as [layer, (key, value)] blocks of D columns, split in one pass
        pasts = cache.split(D, dim=2)  # 2 * NL tensors [Bb, S-1, D]
        states = []
        for i, layer in enumerate(self.layers.layers):
            attn_out, key, value = cached_self_attention(
                layer.self_attn, layer.norm1(x), pasts[2 * i], pasts[2 * i + 1]
            )
            states += [key[:, None], value[:, None]]  # [Bb, 1, D] each
            x = x + attn_out  # [Bb, D]
            keys, values = memory_state[2 * i], memory_state[2 * i + 1]  # [B, D, T] each, per query
            x = x + grouped_cross_attention(layer.multihead_attn, layer.norm2(x), keys, values, cross_bias)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))  # [Bb, D]
        if self.layers.norm is not None:
            x = self.layers.norm(x)
        h = self.output_norm(x)  # [Bb, D]
        column = take(self.score_column, candidates + 1)  # [Bb, C] (padding -> column 0)
        if self.config.token_scheme == "level":  # candidates are nodes of level S: one product
            V = self.level_vocab
            rows = (torch.arange(V, device=h.device) + S * V).clamp(max=self.num_rows - 1)  # [V]
            logits = h @ self.token_embedding(rows).T  # [Bb, V] (rows past the table: never a column)
            if self.bias is not None:
                logits = logits + self.bias[rows]
            scores = logits.gather(1, column)  # [Bb, C]
        else:  # node tokens: the candidates of every beam are distinct rows, a gather is inherent
            scores = torch.bmm(self.token_embedding(column), h[:, :, None])[:, :, 0]  # [Bb, C]
            if self.bias is not None:
                scores = scores + take(self.bias, column)
        return scores.masked_fill(candidates < 0, PAD_SCORE), torch.cat(states, dim=2)  # [Bb, 1, W]


class NodeScorer(nn.Module):
    """TDR-style preference model with the decoder-step signature: ``MLP([u, e, u*e])``.

    ``u`` is the masked mean of the beam's memory, ``e`` the embedding of the candidate node
    (one per global node); the prefix is ignored. A reference implementation: TDR trainers may
    bring their own module, anything with this forward signature exports and serves.
    """

    def __init__(self, dim: int, num_nodes: int, hidden: int = 128) -> None:
        super().__init__()
        self.node_embedding = nn.Embedding(num_nodes, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def user_vector(self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor) -> Tensor:
        """``-> [Bb, D]`` masked mean of each beam's memory row."""
        weights = memory_mask[beam_query].to(memory.dtype)  # [Bb, T]
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return torch.bmm(weights[:, None, :], memory[beam_query])[:, 0]  # [Bb, D]

    def forward(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        u = self.user_vector(memory, memory_mask, beam_query)[:, None, :]  # [Bb, 1, D]
        e = self.node_embedding(candidates.clamp(min=0))  # [Bb, C, D]
        u = u.expand_as(e)
        scores = self.mlp(torch.cat([u, e, u * e], dim=-1))[..., 0]  # [Bb, C]
        return scores.masked_fill(candidates < 0, PAD_SCORE)
