"""URI trainer: the decoder is both the retriever and the indexer (Li et al., ICLR 2025).

One shared :class:`~models.decoder.TokenDecoder` gives, at every index level, a distribution over
the ``k`` tokens of that level for a query (memory = the query encoder's states of the user's
history: by default a frozen copy of the split's SASRec, :mod:`training.methods.uri.query`; or a
:class:`~models.encoder.QueryEncoder` trained from scratch) and for an item (memory = the item's id
and attribute embeddings).
The index is built layer by layer (paper 4.2):

1. level ``l`` trains ``E-step + M-step`` (eqs. 8-10, :mod:`training.methods.uri.losses`) plus the memory
   loss of the levels already assigned (eq. 11), with the assigned tokens as the decoder prefix,
   until a convergence criterion holds (``URIConfig.level_*``);
2. every item is then assigned a level-``l`` token with the capacity-constrained assignment
   (capacity = items under the parent / k), and the level's APE and balance are logged;
3. after level L the items' codes are the leaves (buckets of items); a final stage trains the
   inner-product ranker (sampled softmax, 9 uniform + 1 sibling-leaf negative) with the memory
   loss of all L levels so that the decoder keeps the final index. (The ranker loss also runs
   during the level stages, with uniform negatives: it is what makes the query encoder
   informative early, and on planted data the index forms only once it is.)

:meth:`URIModel.level_logits` runs the decoder's layers over the whole prefix at once (all levels
in one pass); a test holds it to the decoder-step signature ``TokenDecoder.forward``.

Before the index exists the decoder runs on the *complete* k-ary tree of depth L (every token at
every level), whose node ids follow from the code prefix; the exported decoder is rebuilt on the
real index with the same weights (``token_scheme="level"``: a node's token is its code, so both
trees map a (level, token) to the same embedding row).

What is measured is what is served: :func:`train_uri` exports a bundle and evaluates through
``Retriever(load_bundle(dir), backend="onnx")``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from models.decoder import DecoderConfig, TokenDecoder, safe_key_padding
from models.encoder import EncoderConfig, QueryEncoder
from models.index import TreeIndex
from training.bundle_recommender import BundleRecommender
from training.methods.sasrec.model import SASRecModule
from training.methods.uri.losses import (
    balance_loss,
    commitment_loss,
    e_step_loss,
    m_step_loss,
    memory_loss,
    sampled_softmax_loss,
)
from training.methods.uri.query import SasrecQueryEncoder
from training.metrics import average_partition_entropy
from training.registry import TrainContext, TrainedMethod, register_method
from training.splits import EvalSet, training_pairs

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "uri.yaml"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class URIConfig:
    """URI hyper-parameters; ``training/configs/uri.yaml`` documents each choice."""

    k: int = 32
    """Tokens per level (index width)."""
    levels: int = 2
    """Index depth L; leaves are buckets of items."""
    dim: int = 96
    """Model and representation dimension d (with ``query_encoder: sasrec``: the SASRec width)."""
    query_encoder: str = "own"
    """``own``: a QueryEncoder trained from scratch; ``sasrec``: a copy of the split's SASRec baseline
    (:mod:`training.methods.uri.query`), fine-tuned at ``lr * encoder_lr_scale``."""
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
    num_negatives: int = 10
    hard_negatives: int = 1
    ranker_weight: float = 1.0
    ranker_epochs: int = 3
    beam_size: int = 0  # 0 = the catalogue rule (models.beam_policy)
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
        if self.encoder_lr_scale < 0 or self.ranker_encoder_lr_scale < 0:
            raise ValueError(
                "URIConfig.encoder_lr_scale and ranker_encoder_lr_scale must be >= 0, got "
                f"{self.encoder_lr_scale}, {self.ranker_encoder_lr_scale}"
            )

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> URIConfig:
        """The YAML defaults (``configs/uri.yaml`` unless ``path``) with ``overrides`` applied.

        ``overrides`` use the ``genret --set`` convention: ``uri.<field>`` keys (values may be
        strings, converted to the field's type), ``max_epochs`` caps every stage's epochs, other
        methods' keys are ignored; an unknown ``uri.`` field raises ``ValueError``.
        """
        from training.methods.sasrec.train import config_with_overrides

        raw = yaml.safe_load(Path(path or CONFIG_PATH).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path or CONFIG_PATH}: unknown URI config key(s) {unknown}")
        config = config_with_overrides(cls(**raw), dict(overrides or {}), "uri")
        if overrides and "max_epochs" in overrides:
            cap = int(overrides["max_epochs"])
            config = dataclasses.replace(
                config,
                level_max_epochs=min(config.level_max_epochs, cap),
                level_min_epochs=min(config.level_min_epochs, cap),
                ranker_epochs=min(config.ranker_epochs, cap),
            )
        return config


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


# --------------------------------------------------------------------------------------------
# Assignment, APE, negatives


def assign_level(probs: np.ndarray, parents: np.ndarray, k: int) -> np.ndarray:
    """Capacity-constrained token assignment of one level (paper 4.2, Li et al. 2023).

    probs: [N, k] the items' token distributions; parents: [N] int64 group of each item (its code
    prefix; all equal at level 1). Within a group of n items every token takes at most
    ``ceil(n / k)`` items. Returns tokens [N] int64.
    """
    from training.clustering import capacity_assign

    tokens = np.empty(len(probs), dtype=np.int64)
    order = np.argsort(parents, kind="stable")
    bounds = np.flatnonzero(np.diff(parents[order])) + 1
    for group in np.split(order, bounds):
        capacity = np.full(k, math.ceil(len(group) / k), dtype=np.int64)  # [k]
        tokens[group] = capacity_assign(probs[group], capacity)
    return tokens


def group_ids(codes: np.ndarray) -> np.ndarray:
    """``codes[N, l] -> [N]`` int64 id of each distinct prefix (0 when l == 0)."""
    if codes.shape[1] == 0:
        return np.zeros(len(codes), dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def level_report(codes: np.ndarray, level: int, queries: list[np.ndarray]) -> dict[str, float]:
    """APE and bucket sizes of the index truncated at ``level`` (codes [N+1, L], row 0 ignored)."""
    buckets = np.full(len(codes), -1, dtype=np.int64)
    buckets[1:] = group_ids(codes[1:, :level])
    sizes = np.bincount(buckets[1:])
    return {
        "ape": average_partition_entropy(buckets, queries),
        "buckets": len(sizes),
        "bucket_min": int(sizes.min()),
        "bucket_max": int(sizes.max()),
        "bucket_mean": float(sizes.mean()),
    }


class SiblingSampler:
    """Hard negatives (paper 4.3): an item of a sibling leaf (same parent) of the positive's leaf.

    Falls back to another item of the same leaf when the leaf has no sibling, and to a uniform item
    when that leaf holds only the positive.
    """

    def __init__(self, index: TreeIndex, rng: np.random.Generator) -> None:
        self.index = index
        self.rng = rng
        self.leaf_of_item = index.item_path[:, -1].astype(np.int64)  # [N+1] global leaf ids
        self.parent = index.parents()

    def sample(self, positives: np.ndarray) -> np.ndarray:
        """``positives[B] -> [B]`` dense item ids."""
        idx, rng = self.index, self.rng
        leaf = self.leaf_of_item[positives]  # [B] global leaf ids
        first = idx.child_offsets[self.parent[leaf]]  # [B] CSR start of the parent's children
        n_sib = idx.child_offsets[self.parent[leaf] + 1] - first  # leaves under the parent, own included
        own_pos = leaf - idx.child_ids[first]  # from_codes numbers siblings contiguously
        pick = rng.integers(0, np.maximum(n_sib - 1, 1))  # among the other siblings
        pick = np.where(n_sib > 1, pick + (pick >= own_pos), own_pos)
        chosen = idx.child_ids[first + pick] - idx.leaf_start  # [B] 0-based leaf index
        sizes = np.diff(idx.leaf_offsets)
        items = idx.leaf_items[idx.leaf_offsets[chosen] + rng.integers(0, sizes[chosen])]
        lonely = items == positives
        items[lonely] = rng.integers(1, idx.num_items + 1, size=int(lonely.sum()))
        return items


# --------------------------------------------------------------------------------------------
# Training


class _Batches:
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


class URITrainer:
    """Runs the layer-by-layer schedule and the ranker stage on one split."""

    def __init__(self, config: URIConfig, ctx: TrainContext) -> None:
        self.config = config
        self.ctx = ctx
        ds = ctx.dataset
        self.num_items = ds.num_items
        torch.manual_seed(ctx.seed)
        self.rng = np.random.default_rng(ctx.seed)
        attributes = None
        if config.use_attributes and ds.item_attributes is not None and ds.num_attributes > 0:
            attributes = np.zeros((ds.num_items + 1, config.max_attributes), dtype=np.int64)  # [N+1, A]
            for item, attrs in enumerate(ds.item_attributes):
                attrs = attrs[: config.max_attributes]
                attributes[item, : len(attrs)] = attrs
        sasrec = ctx.sasrec().module if config.query_encoder == "sasrec" else None
        self.model = URIModel(
            config, ds.num_items, attributes, ds.num_attributes if attributes is not None else 0, sasrec
        )
        encoder_params = list(self.model.encoder.parameters())
        shared = {id(p) for p in encoder_params}
        rest = [p for p in self.model.parameters() if id(p) not in shared]
        self.optimizer = torch.optim.Adam(
            [{"params": rest, "lr": config.lr}, {"params": encoder_params, "lr": config.lr}],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.frozen_encoder = False
        self.set_encoder_lr_scale(config.encoder_lr_scale)
        self.detach = config.detach_targets  # per epoch: see detach_warmup_epochs
        histories, targets = training_pairs(ctx.split.train, config.max_len)
        if len(targets) == 0:
            raise ValueError("URI needs training sequences with at least two items")
        self.batches = _Batches(histories, targets, config.batch_size, config.steps_per_epoch, self.rng)
        # [N+1, L] assigned tokens, -1 until a level is assigned
        self.codes = np.full((ds.num_items + 1, config.levels), -1, dtype=np.int64)
        self.queries = [s for s in ctx.split.train if len(s) > 1]  # APE queries: training users' items
        self.log: list[dict[str, Any]] = []
        self._parents: tuple[int, np.ndarray, np.ndarray] | None = None  # level, items by parent, offsets

    # ---------------------------------------------------------------- one step
    def _random_items(self, level: int, count: int) -> np.ndarray:
        """``[count]`` random items for the commitment and balance terms.

        Level 1 (or ``balance_per_parent`` off): uniform over all items. Level >= 2: uniform
        within ``ceil(count / balance_parent_items)`` random parents, so that each parent present in
        the batch has about ``balance_parent_items`` items to estimate its children's balance from.
        """
        c = self.config
        if level == 1 or not c.balance_per_parent:
            return self.rng.integers(1, self.num_items + 1, size=count)
        if self._parents is None or self._parents[0] != level:
            groups = group_ids(self.codes[1:, : level - 1])  # [N] parent of every item
            order = np.argsort(groups, kind="stable")  # items (0-based) grouped by parent
            self._parents = (level, order, np.searchsorted(groups[order], np.arange(groups.max() + 2)))
        _, order, offsets = self._parents  # offsets [G+1]
        parents = self.rng.integers(
            0, len(offsets) - 1, size=max(1, math.ceil(count / c.balance_parent_items))
        )
        parent = parents[np.arange(count) % len(parents)]  # [count]
        size = offsets[parent + 1] - offsets[parent]
        return order[offsets[parent] + self.rng.integers(0, size)] + 1

    def _step(self, rows: np.ndarray, level: int, sibling: SiblingSampler | None) -> dict[str, float]:
        """One optimiser step on the pairs ``rows``: the index terms of ``level`` (0 = ranker stage)."""
        hist = torch.as_tensor(self.batches.history(rows))  # [B, T_b]
        pos = self.batches.targets[rows]  # [B]
        q_memory, q_mask, query = self.model.encode_queries(hist)
        if level > 0:
            terms = self._index_terms(q_memory, q_mask, pos, level)
        else:
            terms = self._memory_terms(q_memory, q_mask, pos)
        if self.config.ranker_weight > 0:
            terms["ranker"] = self.config.ranker_weight * self._ranker_term(query, pos, sibling)
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out = {name: float(t.detach()) for name, t in terms.items()}
        out["loss"] = float(loss.detach())
        return out

    def _index_terms(
        self, q_memory: Tensor, q_mask: Tensor, pos_np: np.ndarray, level: int
    ) -> dict[str, Tensor]:
        """Eqs. 8-11 at ``level``: E-step, M-step, commitment, balance (+ memory of the levels above)."""
        c, model = self.config, self.model
        B = len(pos_np)
        pos = torch.as_tensor(pos_np)  # [B]
        rand = torch.as_tensor(self._random_items(level, B))  # [B]
        items = torch.cat([pos, rand])  # [2B] positives then random items
        i_memory, i_mask = model.encode_items(items)
        codes = torch.as_tensor(self.codes)
        q_logits = model.level_logits(q_memory, q_mask, codes[pos, : level - 1])  # level x [B, k]
        i_logits = model.level_logits(i_memory, i_mask, codes[items, : level - 1])  # level x [2B, k]
        q_cur, i_cur = q_logits[-1], i_logits[-1]
        terms = {
            "e_step": e_step_loss(q_cur, i_cur[:B], detach_target=self.detach),
            "m_step": m_step_loss(q_cur, i_cur[:B], detach_target=self.detach),
            "commit": (c.commit_weight if level == 1 else c.commit_weight_deeper) * commitment_loss(i_cur),
        }
        if level > 1 and c.balance_per_parent:  # per parent, over the parent-stratified random items
            groups = model.tree.prefix_nodes(codes[rand, : level - 1])[:, -1]  # [B]
            balance = balance_loss(i_cur[B:], adaptive=c.balance_adaptive, groups=groups)
        else:
            balance = balance_loss(i_cur, adaptive=c.balance_adaptive)
        terms["balance"] = (c.balance_weight if level == 1 else c.balance_weight_deeper) * balance
        if level > 1:
            terms["memory"] = c.memory_weight * memory_loss(
                q_logits[:-1], [x[:B] for x in i_logits[:-1]], codes[pos, : level - 1]
            )
        return terms

    def _memory_terms(self, q_memory: Tensor, q_mask: Tensor, pos_np: np.ndarray) -> dict[str, Tensor]:
        """Ranker stage: eq. 11 over all L levels, so that the decoder keeps the final index."""
        c, model = self.config, self.model
        pos = torch.as_tensor(pos_np)  # [B]
        codes = torch.as_tensor(self.codes)[pos]  # [B, L]
        q_logits = model.level_logits(q_memory, q_mask, codes[:, : c.levels - 1])  # L x [B, k]
        i_memory, i_mask = model.encode_items(pos)
        i_logits = model.level_logits(i_memory, i_mask, codes[:, : c.levels - 1])
        return {"memory": c.memory_weight * memory_loss(q_logits, i_logits, codes)}

    def _ranker_term(self, query: Tensor, pos_np: np.ndarray, sibling: SiblingSampler | None) -> Tensor:
        """Sampled softmax of ``query [B, D]`` over the positive and ``num_negatives`` negatives:
        uniform ones, of which ``hard_negatives`` come from a sibling leaf once the index exists."""
        c = self.config
        B = len(pos_np)
        neg = self.rng.integers(1, self.num_items + 1, size=(B, c.num_negatives))  # [B, n]
        if sibling is not None:
            for j in range(c.hard_negatives):
                neg[:, j] = sibling.sample(pos_np)
        items = torch.as_tensor(np.concatenate([pos_np, neg.reshape(-1)]))  # [B + B*n]
        vectors = self.model.item_vectors(items)  # [B + B*n, D]
        return sampled_softmax_loss(query, vectors[:B], vectors[B:].reshape(B, c.num_negatives, -1))

    def set_encoder_lr_scale(self, scale: float) -> None:
        """The query encoder (param group 1) learns at ``lr * scale``; 0 freezes it (no gradients, no dropout)."""
        self.frozen_encoder = scale == 0
        self.optimizer.param_groups[1]["lr"] = self.config.lr * scale
        for param in self.model.encoder.parameters():
            param.requires_grad_(not self.frozen_encoder)

    def _epoch(self, level: int, desc: str, sibling: SiblingSampler | None = None) -> dict[str, float]:
        self.model.train()
        if self.frozen_encoder:
            self.model.encoder.eval()  # no dropout in a frozen encoder
        sums: dict[str, float] = {}
        chunks = self.batches.epoch()
        for rows in tqdm(chunks, desc=desc, leave=False, mininterval=2.0):
            for name, value in self._step(rows, level, sibling).items():
                sums[name] = sums.get(name, 0.0) + value
        return {name: value / max(1, len(chunks)) for name, value in sums.items()}

    # ---------------------------------------------------------------- item distributions
    @torch.no_grad()
    def item_probs(self, level: int, batch: int = 2048) -> np.ndarray:
        """``[N, k]`` every item's level-``level`` token distribution given its assigned prefix."""
        self.model.eval()
        out = []
        codes = torch.as_tensor(self.codes)
        for start in range(1, self.num_items + 1, batch):
            items = torch.arange(start, min(start + batch, self.num_items + 1))
            memory, mask = self.model.encode_items(items)
            logits = self.model.level_logits(memory, mask, codes[items, : level - 1])[-1]  # [M, k]
            out.append(torch.softmax(logits, dim=-1).numpy())
        return np.concatenate(out)

    # ---------------------------------------------------------------- the schedule
    def train_level(self, level: int) -> dict[str, Any]:
        c = self.config
        prev_loss: float | None = None
        prev_tokens = self.item_probs(level).argmax(1)
        epochs = 0
        for epoch in range(1, c.level_max_epochs + 1):
            self.detach = c.detach_targets or epoch <= c.detach_warmup_epochs
            stats = self._epoch(level, f"URI level {level}/{c.levels} epoch {epoch}")
            tokens = self.item_probs(level).argmax(1)
            changed = float((tokens != prev_tokens).mean())
            rel = (
                abs(prev_loss - stats["loss"]) / max(abs(prev_loss), 1e-12)
                if prev_loss is not None
                else math.inf
            )
            epochs = epoch
            log.info(
                "URI level %d epoch %d: %s | argmax tokens used %d/%d, changed %.3f, rel loss change %.4f",
                level,
                epoch,
                " ".join(f"{n}={v:.4f}" for n, v in stats.items()),
                len(np.unique(tokens)),
                c.k,
                changed,
                rel,
            )
            self.log.append({"stage": f"level{level}", "epoch": epoch, **stats, "token_change": changed})
            prev_loss, prev_tokens = stats["loss"], tokens
            if (
                epoch >= c.level_min_epochs
                and rel < c.converge_rel_loss
                and changed < c.converge_token_change
            ):
                break
        probs = self.item_probs(level)  # [N, k]
        parents = group_ids(self.codes[1:, : level - 1])
        self.codes[1:, level - 1] = assign_level(probs, parents, c.k)
        report = {"level": level, "epochs": epochs, **level_report(self.codes, level, self.queries)}
        report["argmax_agreement"] = float((probs.argmax(1) == self.codes[1:, level - 1]).mean())
        log.info("URI level %d assigned: %s", level, report)
        return report

    def train_ranker(self, index: TreeIndex) -> None:
        sibling = SiblingSampler(index, self.rng)
        self.set_encoder_lr_scale(self.config.ranker_encoder_lr_scale)
        for epoch in range(1, self.config.ranker_epochs + 1):
            stats = self._epoch(0, f"URI ranker epoch {epoch}", sibling)
            log.info("URI ranker epoch %d: %s", epoch, " ".join(f"{n}={v:.4f}" for n, v in stats.items()))
            self.log.append({"stage": "ranker", "epoch": epoch, **stats})

    def fit(self) -> tuple[TreeIndex, list[dict[str, Any]]]:
        """Levels 1..L, then the ranker stage; returns the index and one report per level."""
        threads = torch.get_num_threads()
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        try:
            reports = [
                self.train_level(level) for level in tqdm(range(1, self.config.levels + 1), desc="URI levels")
            ]
            index = TreeIndex.from_codes(self.codes, self.config.k, token_scheme="level")
            index.validate()
            self.train_ranker(index)
        finally:
            torch.set_num_threads(threads)
        return index, reports

    # ---------------------------------------------------------------- export
    def serving_decoder(self, index: TreeIndex) -> TokenDecoder:
        """The trained decoder rebuilt on the real index (same weights, same token rows)."""
        trained = self.model.decoder
        decoder = TokenDecoder(self.model.decoder_config(), index.node_token, index.level_offsets)
        if int(index.node_token.max()) + 1 != self.config.k:
            raise RuntimeError(
                f"the URI index uses tokens 0..{int(index.node_token.max())}, expected all of 0..{self.config.k - 1}: "
                "the decoder's token rows would not line up"
            )
        state = trained.state_dict()
        rows = decoder.num_rows
        for name in ("token_embedding.weight", "bias"):
            if name in state:
                state[name] = state[name][:rows]
        decoder.load_state_dict(state)
        return decoder.eval()

    @torch.no_grad()
    def item_table(self) -> np.ndarray:
        """``[N+1, D]`` rerank vectors, row 0 = 0."""
        self.model.eval()
        table = self.model.item_vectors(torch.arange(self.num_items + 1)).numpy().astype(np.float32)
        table[0] = 0.0
        return table


class URIBundleRecommender(BundleRecommender):
    """Recommends through the exported bundle, exactly as the service does (URI's leaves are buckets
    of items: the beam counts leaves, widened only when they cannot hold ``k`` items)."""

    def diagnose(self, eval_set: EvalSet, k: int = 20) -> dict[str, float]:
        """Where recall is lost (history excluded from the results, as in the evaluation):
        ``beam_coverage`` = share of the targets inside the beam's leaves, ``candidates`` = items reranked per user,
        ``recall@k`` through the beam, ``exhaustive_recall@k`` = the same query and item vectors
        ranking the whole catalogue (no index)."""
        r = self.retriever
        item_emb = r.item_emb  # [N+1, Dr]
        leaf_of_item = torch.as_tensor(r.bundle.index.item_path[:, -1].astype(np.int64))  # [N+1]
        covered, beam_hits, full_hits, cands = [], [], [], []
        for start in range(0, len(eval_set.histories), self.batch_size):
            histories = eval_set.histories[start : start + self.batch_size]
            states = r.encode(histories)
            result = r.search(states, k, self.beam_size, histories)
            scores = states.query.float() @ item_emb.T  # [B, N+1]
            scores[:, 0] = -torch.inf
            for row, (hist, targets) in enumerate(zip(histories, eval_set.targets[start:], strict=False)):
                scores[row, torch.as_tensor(hist)] = -torch.inf
                target = np.unique(targets)  # as the evaluation counts them (history items cannot be hit)
                if not len(target):
                    continue
                leaves = torch.as_tensor(result.leaves[row])
                in_beam = torch.isin(leaf_of_item[torch.as_tensor(target)], leaves[leaves >= 0])
                covered.append(float(in_beam.float().mean()))
                beam_hits.append(len(np.intersect1d(result.items[row], target)) / len(target))
                top = torch.topk(scores[row], k).indices.numpy()
                full_hits.append(len(np.intersect1d(top, target)) / len(target))
                cands.append(float(result.num_candidates[row]))
        return {
            "beam_coverage": float(np.mean(covered)),
            "candidates": float(np.mean(cands)),
            f"recall@{k}": float(np.mean(beam_hits)),
            f"exhaustive_recall@{k}": float(np.mean(full_hits)),
        }


def train_uri(ctx: TrainContext) -> TrainedMethod:
    """Train URI on ``ctx.split``, export the bundle to ``ctx.workdir / "uri"``, serve from it."""
    from training.export import export_bundle

    config = URIConfig.load(overrides=ctx.config_overrides)
    if "uri.max_len" not in ctx.config_overrides:
        config = dataclasses.replace(config, max_len=ctx.split.max_len)
    log.info("URI config: %s", config)
    started = time.perf_counter()
    trainer = URITrainer(config, ctx)
    index, reports = trainer.fit()
    train_seconds = time.perf_counter() - started
    ds = ctx.dataset
    popularity = np.bincount(np.concatenate(ctx.split.train), minlength=ds.num_items + 1).astype(np.float32)
    popularity[0] = 0.0
    stats = index.stats()
    info: dict[str, Any] = {"train_seconds": round(train_seconds, 1)}
    for r in reports:
        info[f"ape_l{r['level']}"] = round(r["ape"], 4)
        info[f"epochs_l{r['level']}"] = r["epochs"]
    info.update(
        leaves=stats["num_leaves"],
        leaf_size_min=stats["leaf_size_min"],
        leaf_size_max=stats["leaf_size_max"],
        leaf_size_mean=round(stats["leaf_size_mean"], 2),
    )
    out_dir = Path(ctx.workdir) / "uri"
    trainer.model.eval()
    bundle_dir = export_bundle(
        out_dir,
        name=f"uri-{ds.name}",
        method="uri",
        encoder=trainer.model.encoder,
        decoder=trainer.serving_decoder(index),
        index=index,
        item_emb=trainer.item_table(),
        item_ids=ds.vocab.raw_ids,
        popularity=popularity,
        score_mode="logprob",
        max_history=config.max_len,
        metrics={k: v for k, v in info.items() if isinstance(v, int | float)},
        config={**dataclasses.asdict(config), "level_reports": reports},
        dataset_fingerprint=ds.fingerprint(),
    )
    (out_dir.parent / "uri_train_log.json").write_text(
        json.dumps({"reports": reports, "epochs": trainer.log}, indent=1)
    )
    recommender = URIBundleRecommender(Path(bundle_dir), config.beam_size, batch_size=config.eval_batch_size)
    diagnosis = recommender.diagnose(ctx.split.valid)
    log.info("URI validation diagnosis (through the bundle): %s", diagnosis)
    info.update({f"valid_{name}": round(value, 4) for name, value in diagnosis.items()})
    return TrainedMethod(recommender=recommender, bundle_dir=Path(bundle_dir), info=info)


register_method("uri", train_uri)
