"""SEATER's modules: one token table for every tree node (a leaf's row is its item's embedding),
the encoder-decoder over it, the ranking similarity, and the index arrays the losses read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder, safe_key_padding
from models.nets.encoder import EncoderConfig, QueryEncoder
from training.methods.sasrec.model import SASRecModule
from training.methods.sasrec.query_encoder import SasrecQueryEncoder
from training.methods.seater.config import SeaterConfig


class SharedTokenTable(nn.Module):
    """One embedding per tree node; an item's embedding is its leaf's row (paper section 3.2.2)."""

    item_node: Tensor  # [N+1] global leaf node of every item (buffer)

    def __init__(self, index: TreeIndex, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(index.num_nodes, dim)
        item_node = np.zeros(index.num_items + 1, np.int64)  # padding item -> root row (always masked)
        item_node[1:] = index.item_path[1:, -1]
        self.register_buffer("item_node", torch.from_numpy(item_node), persistent=False)

    def forward(self, rows: Tensor) -> Tensor:
        """Node rows ``[...] int64 -> [..., D]`` (the decoder's token table)."""
        return self.table(rows)


class ItemsAsLeaves(nn.Module):
    """The encoder's item embedding: dense item ids ``[B, T] -> [B, T, D]`` via the leaf rows."""

    def __init__(self, tokens: SharedTokenTable) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, items: Tensor) -> Tensor:
        return self.tokens.table(self.tokens.item_node[items])


class SeaterEncoder(nn.Module):
    """``(history[B,T], history_mask[B,T]) -> (memory[B,T,D], query[B,Dr])`` for ``encoder.onnx``.

    ``memory`` comes from the SEATER encoder; ``query`` from ``query_model`` (the frozen SASRec user
    vector), the rerank vector against the bundle's ``item_emb``.
    """

    def __init__(self, encoder: nn.Module, query_model: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.query_model = query_model

    def forward(self, history: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        memory, _ = self.encoder(history, history_mask)  # [B, T, D]
        return memory, self.query_model(history, history_mask)  # [B, Dr]


class SeaterModel(nn.Module):
    """Encoder, decoder, the shared token table and the ranking similarity ``W_s``.

    ``sasrec``: with ``query_encoder: sasrec``, the module whose frozen copy encodes the history (its
    states are the decoder's memory); the token table then serves the decoder alone.
    """

    def __init__(
        self, index: TreeIndex, cfg: SeaterConfig, max_len: int, sasrec: SASRecModule | None = None
    ) -> None:
        super().__init__()
        if cfg.query_encoder not in ("own", "sasrec"):
            raise ValueError(
                f"SeaterModel takes query_encoder 'own' or 'sasrec', got {cfg.query_encoder!r} "
                "('auto' is resolved by the trainer, which builds one model of each)"
            )
        self.tokens = SharedTokenTable(index, cfg.dim)
        self.encoder: nn.Module
        self.frozen_encoder = cfg.query_encoder == "sasrec"
        if self.frozen_encoder:
            if sasrec is None:
                raise ValueError("SeaterConfig.query_encoder='sasrec' needs the split's SASRec module")
            encoder = SasrecQueryEncoder(sasrec)
            if encoder.dim != cfg.dim:
                raise ValueError(f"SEATER dim={cfg.dim} must equal the SASRec width {encoder.dim}")
            encoder.requires_grad_(False)
            self.encoder = encoder
        else:
            self.encoder = QueryEncoder(
                EncoderConfig(
                    num_items=index.num_items,
                    dim=cfg.dim,
                    num_layers=cfg.layers,
                    num_heads=cfg.heads,
                    ff_mult=cfg.ffn_mult,
                    max_len=max_len,
                    dropout=cfg.dropout,
                    causal=False,
                    pooling="mean",
                ),
                item_embedding=ItemsAsLeaves(self.tokens),
            )
        self.decoder = TokenDecoder(
            DecoderConfig(
                dim=cfg.dim,
                num_layers=cfg.layers,
                num_heads=cfg.heads,
                ff_mult=cfg.ffn_mult,
                dropout=cfg.dropout,
                token_scheme="node",
                use_bias=False,
            ),
            node_token=index.node_token,
            level_offsets=index.level_offsets,
            token_embedding=self.tokens,
        )
        # W_s of s(p, q) = sigmoid(p^T W_s q). Mean-pooled LayerNorm states have norm ~ sqrt(D), so
        # W_s = I would start p^T q at ~D and the sigmoid saturated (flat ranking loss at the margin
        # sum, no gradient); I / D starts it near a cosine, in the sigmoid's slope.
        self.rank_w = nn.Parameter(torch.eye(cfg.dim) / cfg.dim)

    def train(self, mode: bool = True) -> SeaterModel:
        """As ``nn.Module.train``, but a frozen encoder stays in eval mode (no dropout on its states)."""
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self

    def path_states(self, memory: Tensor, memory_mask: Tensor, paths: Tensor) -> Tensor:
        """Decoder hidden states at every position of Q paths per user: ``paths[B, Q, S]`` -> ``[B, Q, S, D]``.

        The same computation as :meth:`TokenDecoder.hidden` (which keeps the last position only),
        with the Q paths of a user laid side by side in one sequence under a block-diagonal causal
        mask: every path sees only its own prefix, and the cross-attention reads the user's memory
        once instead of once per path.
        """
        dec = self.decoder
        B, Q, S = paths.shape
        node_row = cast(Tensor, dec.node_row)  # [num_nodes] token row of every node
        levels = torch.arange(S, device=paths.device)  # [S] level of each prefix position
        x = dec.token_embedding(node_row[paths]) + dec.level_embedding(levels)  # [B, Q, S, D]
        x = x.reshape(B, Q * S, -1)  # [B, Q*S, D]
        block = torch.arange(Q * S, device=paths.device) // S  # [Q*S] path of each position
        causal = torch.ones(Q * S, Q * S, dtype=torch.bool, device=paths.device).triu(diagonal=1)
        blocked = causal | (block[:, None] != block[None, :])  # [Q*S, Q*S] True = may not attend
        key_padding = safe_key_padding(memory_mask)  # [B, T]
        out = dec.layers(x, memory, tgt_mask=blocked, memory_key_padding_mask=key_padding)  # [B, Q*S, D]
        return dec.output_norm(out).reshape(B, Q, S, -1)  # [B, Q, S, D]


@dataclass(frozen=True)
class TreeTables:
    """Index arrays the losses need, as tensors."""

    paths: Tensor  # [N+1, L+1] root + item path (row 0 = root then 0s; never a target)
    item_path: Tensor  # [N+1, L]
    children: Tensor  # [num_nodes, C] global ids of children, -1 padded
    child_pos: Tensor  # [num_nodes] position of a node among its parent's children (root: 0)

    @classmethod
    def from_index(cls, index: TreeIndex) -> TreeTables:
        num_nodes, width = index.num_nodes, index.max_branching
        counts = np.diff(index.child_offsets)
        width = max(width, int(counts.max()))
        children = np.full((num_nodes, width), -1, np.int64)
        child_pos = np.zeros(num_nodes, np.int64)
        for node in range(num_nodes):
            kids = index.children(node)
            children[node, : kids.size] = kids
            child_pos[kids] = np.arange(kids.size)
        item_path = index.item_path.astype(np.int64).copy()
        item_path[0] = 0
        paths = np.concatenate([np.zeros((item_path.shape[0], 1), np.int64), item_path], axis=1)
        return cls(
            paths=torch.from_numpy(paths),
            item_path=torch.from_numpy(item_path),
            children=torch.from_numpy(children),
            child_pos=torch.from_numpy(child_pos),
        )


def init_tokens_from_items(model: SeaterModel, index: TreeIndex, item_emb: np.ndarray) -> None:
    """Leaf rows <- item embeddings; every inner node <- the mean of its items (root included)."""
    N, L = index.num_items, index.levels
    if item_emb.shape != (N + 1, model.tokens.table.embedding_dim):
        raise ValueError(
            f"item embeddings are {item_emb.shape}, expected {(N + 1, model.tokens.table.embedding_dim)}"
        )
    table = np.zeros((index.num_nodes, item_emb.shape[1]), np.float64)
    counts = np.zeros(index.num_nodes, np.float64)
    emb = item_emb[1:].astype(np.float64)  # [N, D]
    for level in range(L):
        nodes = index.item_path[1:, level].astype(np.int64)  # [N]
        np.add.at(table, nodes, emb)
        np.add.at(counts, nodes, 1.0)
    table[0] = emb.mean(axis=0)
    counts[0] = 1.0
    table /= np.maximum(counts, 1.0)[:, None]
    with torch.no_grad():
        model.tokens.table.weight.copy_(torch.from_numpy(table).float())
