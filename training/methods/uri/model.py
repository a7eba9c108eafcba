"""URI's modules: the complete k-ary tree used while the index is learned, the item tower and the
model (query encoder, item tower, the one decoder shared by every level)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder, safe_key_padding
from models.nets.encoder import EncoderConfig, QueryEncoder
from training.methods.sasrec.model import SASRecModule
from training.methods.sasrec.query_encoder import SasrecQueryEncoder
from training.methods.uri.config import URIConfig

# --------------------------------------------------------------------------------------------
# Configuration


# --------------------------------------------------------------------------------------------
# The complete k-ary tree used while the index is being learned


@dataclass(frozen=True)
class FullTree:
    """Node ids of the complete ``k``-ary tree of depth ``levels`` (the order of TreeIndex.from_codes).

    Level ``l`` node of code prefix ``(c_1..c_l)`` has id ``start[l] + sum_j c_j k^(l-j)``.
    """

    k: int
    levels: int
    index: TreeIndex

    @classmethod
    def build(cls, k: int, levels: int) -> FullTree:
        leaves = np.arange(k**levels, dtype=np.int64)
        codes = np.zeros((k**levels + 1, levels), dtype=np.int64)  # [k^L + 1, L]
        for level in range(levels):
            codes[1:, level] = (leaves // k ** (levels - 1 - level)) % k
        return cls(k, levels, TreeIndex.from_codes(codes, k, token_scheme="level"))

    def prefix_nodes(self, codes: Tensor) -> Tensor:
        """``codes[B, S]`` (levels 1..S) -> ``[B, S+1]`` global node ids, root first."""
        starts = torch.as_tensor(self.index.level_offsets, device=codes.device)
        local = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)  # [B]
        nodes = [local]  # root = 0
        for level in range(codes.shape[1]):
            local = local * self.k + codes[:, level]
            nodes.append(starts[level + 1] + local)
        return torch.stack(nodes, dim=1)  # [B, S+1]

    def child_nodes(self, nodes: Tensor, level: int) -> Tensor:
        """``nodes[B]`` of level ``level`` -> ``[B, k]`` ids of their children (level ``level+1``)."""
        starts = self.index.level_offsets
        local = nodes - int(starts[level])  # [B]
        children = local[:, None] * self.k + torch.arange(self.k, device=nodes.device)[None]  # [B, k]
        return int(starts[level + 1]) + children


# --------------------------------------------------------------------------------------------
# Modules


class ItemFeatures(nn.Module):
    """Item id embedding plus the mean of its attribute embeddings: ``items[...] -> [..., D]``.

    Used as the query encoder's item embedding (history items) and as the item tower.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        attributes: np.ndarray | None,
        num_attributes: int,
        id_embedding: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        if id_embedding is None:  # else shared with (and initialised by) the query encoder
            id_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
            nn.init.normal_(id_embedding.weight, std=dim**-0.5)
            with torch.no_grad():
                id_embedding.weight[0].zero_()
        self.id_embedding = id_embedding
        self.attr_embedding: nn.Embedding | None = None
        has_attributes = attributes is not None and num_attributes > 0
        table = (
            torch.as_tensor(attributes, dtype=torch.long) if has_attributes else None
        )  # [N+1, A], 0 = none
        self.register_buffer("attributes", table)
        if has_attributes:
            self.attr_embedding = nn.Embedding(num_attributes + 1, dim, padding_idx=0)
            nn.init.normal_(self.attr_embedding.weight, std=dim**-0.5)
            with torch.no_grad():
                self.attr_embedding.weight[0].zero_()

    def forward(self, items: Tensor) -> Tensor:
        x = self.id_embedding(items)  # [..., D]
        table = self._buffers["attributes"]
        if self.attr_embedding is not None and table is not None:
            attrs = table[items]  # [..., A]
            count = (attrs > 0).sum(-1, keepdim=True).clamp(min=1).to(x.dtype)  # [..., 1]
            x = x + self.attr_embedding(attrs).sum(-2) / count
        return x

    def memory(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """``items[M] -> (memory[M, 1+A, D], mask[M, 1+A])``: the item as the decoder sees it."""
        ids = self.id_embedding(items)[:, None]  # [M, 1, D]
        table = self._buffers["attributes"]
        if self.attr_embedding is None or table is None:
            return ids, torch.ones(ids.shape[:2], dtype=torch.bool, device=items.device)
        attrs = table[items]  # [M, A]
        memory = torch.cat([ids, self.attr_embedding(attrs)], dim=1)  # [M, 1+A, D]
        mask = torch.cat([torch.ones_like(attrs[:, :1], dtype=torch.bool), attrs > 0], dim=1)  # [M, 1+A]
        return memory, mask


class URIModel(nn.Module):
    """Query encoder, item tower and the shared decoder (on the complete tree while training).

    ``sasrec``: start the query encoder from this SASRec module (``query_encoder: sasrec``); the
    item tower then shares its item table, and the ranker's item vectors are that table alone
    (what the SASRec query was trained against), while the decoder sees ids and attributes.
    """

    def __init__(
        self,
        config: URIConfig,
        num_items: int,
        attributes: np.ndarray | None,
        num_attributes: int,
        sasrec: SASRecModule | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tree = FullTree.build(config.k, config.levels)
        self.encoder: nn.Module
        if sasrec is not None:
            encoder = SasrecQueryEncoder(sasrec)
            if encoder.dim != config.dim:
                raise ValueError(
                    f"URIConfig.dim={config.dim} must equal the SASRec width {encoder.dim} with "
                    "query_encoder=sasrec (set uri.dim)"
                )
            self.items = ItemFeatures(
                num_items, config.dim, attributes, num_attributes, id_embedding=encoder.item_embedding
            )
            self.encoder = encoder
        else:
            self.items = ItemFeatures(num_items, config.dim, attributes, num_attributes)
            self.encoder = QueryEncoder(
                EncoderConfig(
                    num_items=num_items,
                    dim=config.dim,
                    num_layers=config.encoder_layers,
                    num_heads=config.heads,
                    max_len=config.max_len,
                    dropout=config.dropout,
                ),
                item_embedding=self.items,
            )
        self.rank_with_attributes = sasrec is None
        self.decoder = TokenDecoder(
            self.decoder_config(), self.tree.index.node_token, self.tree.index.level_offsets
        )
        self.item_norm = nn.LayerNorm(config.dim)  # item memory on the scale of the encoder's output_norm

    def decoder_config(self) -> DecoderConfig:
        c = self.config
        return DecoderConfig(
            dim=c.dim, num_layers=c.decoder_layers, num_heads=c.heads, dropout=c.dropout, token_scheme="level"
        )

    def encode_queries(self, history: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``history[B, T] -> (memory[B, T, D], mask[B, T], query[B, D])``."""
        mask = history > 0
        memory, query = self.encoder(history, mask)
        return memory, mask, query

    def encode_items(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """``items[M] -> (memory[M, 1+A, D], mask[M, 1+A])``."""
        memory, mask = self.items.memory(items)
        return self.item_norm(memory), mask

    def item_vectors(self, items: Tensor) -> Tensor:
        """``items[M] -> [M, D]`` rerank representations (inner product with ``query``)."""
        return self.items(items) if self.rank_with_attributes else self.items.id_embedding(items)

    def level_logits(self, memory: Tensor, mask: Tensor, prefix_codes: Tensor) -> list[Tensor]:
        """Teacher-forced logits of levels ``1..S+1`` given ``prefix_codes[B, S]``: a list of ``[B, k]``.

        One decoder pass over the prefix (causal): position ``s`` predicts the level ``s+1`` token.
        """
        dec = self.decoder
        prefix = self.tree.prefix_nodes(prefix_codes)  # [B, S+1]
        S1 = prefix.shape[1]
        positions = torch.arange(S1, device=prefix.device)
        x = dec.token_embedding(dec.node_row[prefix]) + dec.level_embedding(positions)[None]  # [B, S+1, D]
        causal = torch.ones(S1, S1, dtype=torch.bool, device=prefix.device).triu(diagonal=1)
        out = dec.layers(
            x, memory, tgt_mask=causal, memory_key_padding_mask=safe_key_padding(mask)
        )  # [B, S+1, D]
        hidden = dec.output_norm(out)  # [B, S+1, D]
        return [
            dec.score_hidden(hidden[:, s], self.tree.child_nodes(prefix[:, s], s))  # [B, k]
            for s in range(S1)
        ]
