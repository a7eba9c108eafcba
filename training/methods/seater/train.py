"""SEATER trainer (Si et al. 2024): balanced k-ary semantic identifiers + an encoder-decoder trained
with a generation loss and two contrastive losses, served through the common bundle.

Pipeline of :func:`train_seater`:

1. identifiers: the SASRec item embeddings of the split are clustered into a balanced k-ary tree
   by constrained k-means (:func:`training.clustering.balanced_tree_codes`, Algorithm 1); every
   node is its own token (``token_scheme="node"``) and every leaf holds exactly one item.
2. model: one embedding table ``E[num_nodes, D]`` for all tokens; the leaf row of an item *is* that
   item's embedding, read by the encoder for the history and by the decoder for the leaf level
   (:class:`SharedTokenTable`). Encoder = :class:`models.encoder.QueryEncoder`, decoder =
   :class:`models.decoder.TokenDecoder` (no bias: eq. 4 is ``softmax(y_i^T e_c)`` over the
   children ``c`` of the current node, exactly the decoder step with ``score_mode="logprob"``).
3. losses: ``L_gen + lambda_a L_ali + lambda_r L_rank`` (:mod:`training.methods.seater.losses`), L2 via
   Adam weight decay; ``align=false`` / ``rank=false`` switch the contrastive terms off.
Under ``torchrun`` (``genret train``, :mod:`training.distributed`) every rank trains on its shard of
the training pairs through a DDP-wrapped :class:`SeaterLoss`; rank 0 builds the index (broadcast to
the others), decides on the validation loss and exports the bundle.

4. export: the bundle's ``query`` (rerank vector) is the SASRec user vector computed inside
   ``encoder.onnx`` and ``item_emb`` the SASRec item table (see ``configs/seater.yaml``); the
   recommender evaluates through ``Retriever(load_bundle(dir), backend="onnx")``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from models.decoder import PAD_SCORE, DecoderConfig, TokenDecoder, safe_key_padding
from models.encoder import EncoderConfig, QueryEncoder
from models.index import TreeIndex
from training import distributed
from training.bundle_recommender import BundleRecommender, SasrecQuery
from training.clustering import balanced_tree_codes
from training.export import export_bundle
from training.methods.sasrec.model import SASRec
from training.methods.seater.losses import (
    alignment_loss,
    generation_loss,
    ranking_loss,
    sample_ranking_negatives,
)
from training.registry import TrainContext, TrainedMethod, register_method
from training.splits import training_pairs

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "seater.yaml"
SHARED_OVERRIDES = frozenset({"cache_dir", "max_epochs"})  # read by several methods


@dataclass(frozen=True)
class SeaterConfig:
    """Hyper-parameters; ``configs/seater.yaml`` documents every one and the paper's values."""

    branching: int = 16
    kmeans_iters: int = 10
    dim: int = 64
    layers: int = 1
    heads: int = 2
    ffn_mult: int = 2
    dropout: float = 0.2
    init_from_sasrec: bool = True
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
    beam_size: int = 0  # 0 = the catalogue rule (models.beam_policy)
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
        if self.rerank not in ("sasrec",):
            raise ValueError(f"SeaterConfig.rerank must be 'sasrec', got {self.rerank!r}")

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, path: Path = CONFIG_PATH) -> SeaterConfig:
        """The YAML defaults with ``overrides`` applied (``--set key=value``; strings are coerced).

        Keys are a field name or ``seater.<field>``; ``max_epochs`` (the shorthand every method
        honours) sets ``epochs``; ``cache_dir`` and keys of other namespaces (``sasrec.lr``) are left
        to their owners. Any other key is an error, so a typo cannot silently train the wrong model.
        """
        values: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown SEATER config key(s) {unknown}; known: {sorted(fields)}")
        for key, value in (overrides or {}).items():
            name = key.removeprefix("seater.")
            if name == "max_epochs" and "seater.epochs" not in (overrides or {}):
                values["epochs"] = value
            elif name in fields:
                values[name] = value
            elif key in SHARED_OVERRIDES or ("." in key and not key.startswith("seater.")):
                continue
            else:
                raise ValueError(f"unknown SEATER config key {key!r}; known: {sorted(fields)}")
        default = cls()
        return cls(**{k: _coerce(k, v, type(getattr(default, k))) for k, v in values.items()})


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"SEATER config {key}={value!r} is not a boolean")
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"SEATER config {key}={value!r} is not a {kind.__name__}") from exc


# ---------------------------------------------------------------------------------------------- model
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

    def __init__(self, encoder: QueryEncoder, query_model: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.query_model = query_model

    def forward(self, history: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        memory, _ = self.encoder(history, history_mask)  # [B, T, D]
        return memory, self.query_model(history, history_mask)  # [B, Dr]


class SeaterModel(nn.Module):
    """Encoder, decoder, the shared token table and the ranking similarity ``W_s``."""

    def __init__(self, index: TreeIndex, cfg: SeaterConfig, max_len: int) -> None:
        super().__init__()
        self.tokens = SharedTokenTable(index, cfg.dim)
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


@dataclass(frozen=True)
class LossParts:
    total: Tensor
    gen: Tensor
    ali: Tensor
    rank: Tensor


def seater_losses(
    model: SeaterModel,
    tables: TreeTables,
    cfg: SeaterConfig,
    history: Tensor,
    target: Tensor,
    generator: torch.Generator | None = None,
) -> LossParts:
    """The three losses on one batch: ``history[B, T]`` (0 = pad), ``target[B]`` dense ids."""
    mask = history > 0  # [B, T]
    memory, _ = model.encoder(history, mask)  # [B, T, D]
    B = history.shape[0]
    L = tables.item_path.shape[1]
    path = tables.paths[target]  # [B, L+1] root .. leaf
    paths = path[:, None]  # [B, 1, L+1]
    shared = None
    if cfg.rank:
        shared_lengths = list(range(L - 1, -1, -1))[: cfg.num_negatives]  # most similar first
        negatives, shared = sample_ranking_negatives(tables.item_path, target, shared_lengths, generator)
        paths = torch.cat([paths, tables.paths[negatives]], dim=1)  # [B, 1+q, L+1]
    all_states = model.path_states(memory, mask, paths)  # [B, 1+q, L+1, D]
    states = all_states[:, 0]  # [B, L+1, D] the positive

    # generation (eq. 5): position i predicts the level-(i+1) node among the children of path[i]
    cand = tables.children[path[:, :L]]  # [B, L, C]
    cand_emb = model.tokens(cand.clamp(min=0))  # [B, L, C, D]
    logits = torch.einsum("bld,blcd->blc", states[:, :L], cand_emb).masked_fill(cand < 0, PAD_SCORE)
    gen = generation_loss(logits, tables.child_pos[path[:, 1:]])
    zero = gen.new_zeros(())

    ali = zero
    if cfg.align and L >= 2:
        # eq. 6 level by level (a level's tokens against the distinct parents of the batch at the level
        # above): a token's own children are never among its negatives. Level 1 has a single parent
        # (the root), where InfoNCE is identically 0, so it is skipped.
        parts = []
        for level in range(2, L + 1):
            child, parent = path[:, level], path[:, level - 1]  # [B]
            parts.append(alignment_loss(model.tokens(child), model.tokens(parent), parent, cfg.tau))
        ali = torch.stack(parts).mean()

    rnk = zero
    if shared is not None:
        z_y = all_states.mean(dim=2)  # [B, 1+q, D] MEAN(Y) of each identifier (eq. 7)
        positive = torch.full((B, 1), L, dtype=shared.dtype, device=shared.device)
        weights = mask.to(memory.dtype)  # [B, T]
        z_x = (memory * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)  # [B, D]
        rnk = ranking_loss(z_x, z_y, torch.cat([positive, shared], dim=1), model.rank_w, cfg.beta)

    total = gen + cfg.lambda_align * ali + cfg.lambda_rank * rnk
    return LossParts(total=total, gen=gen, ali=ali, rank=rnk)


class SeaterLoss(nn.Module):
    """The training step as a module (DDP hooks ``forward``): ``(history[B, T], target[B]) -> (total, gen, ali, rank)``."""

    def __init__(self, model: SeaterModel, tables: TreeTables, cfg: SeaterConfig) -> None:
        super().__init__()
        self.model = model
        self.tables = tables
        self.cfg = cfg

    def forward(
        self, history: Tensor, target: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        parts = seater_losses(self.model, self.tables, self.cfg, history, target, generator)
        return parts.total, parts.gen, parts.ali, parts.rank


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


# ---------------------------------------------------------------------------------------------- training
def build_index(item_emb: np.ndarray, cfg: SeaterConfig, seed: int) -> TreeIndex:
    """Algorithm 1: balanced k-ary tree over the item embeddings, one token per node."""
    codes = balanced_tree_codes(item_emb, k=cfg.branching, seed=seed, iters=cfg.kmeans_iters)
    index = TreeIndex.from_codes(codes, cfg.branching, token_scheme="node")
    index.validate()
    if index.num_leaves != index.num_items:
        raise ValueError(
            f"SEATER needs one item per leaf, got {index.num_leaves} leaves for {index.num_items} items"
        )
    return index


def _batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _valid_pairs(ctx: TrainContext, max_pairs: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """First target of each validation user, left-padded histories ``[P, T]``."""
    T = ctx.split.max_len
    hist = np.zeros((len(ctx.split.valid.histories), T), np.int64)
    for i, h in enumerate(ctx.split.valid.histories):
        h = np.asarray(h, np.int64)[-T:]
        if h.size:
            hist[i, T - h.size :] = h
    tgt = np.asarray([t[0] for t in ctx.split.valid.targets], np.int64)
    return hist[:max_pairs], tgt[:max_pairs]


def train_model(
    model: SeaterModel, tables: TreeTables, cfg: SeaterConfig, ctx: TrainContext
) -> dict[str, Any]:
    """Adam over the training pairs; keeps the epoch with the lowest validation generation loss.

    Under torchrun each rank steps on its shard of the pairs with DDP; rank 0 computes the
    validation loss and broadcasts it, so every rank keeps the same best epoch.
    """
    dist = distributed.current()
    hist_np, tgt_np = training_pairs(ctx.split.train, ctx.split.max_len)
    rng = np.random.default_rng(ctx.seed)
    if cfg.max_train_pairs and hist_np.shape[0] > cfg.max_train_pairs:
        keep = rng.choice(hist_np.shape[0], cfg.max_train_pairs, replace=False)
        hist_np, tgt_np = hist_np[keep], tgt_np[keep]
    num_pairs = int(hist_np.shape[0])
    if dist.is_distributed:  # equal-sized strided shards: every rank takes the same number of steps
        shard = dist.shard_indices(num_pairs)
        hist_np, tgt_np = hist_np[shard], tgt_np[shard]
    history, target = torch.from_numpy(hist_np), torch.from_numpy(tgt_np)
    v_hist, v_tgt = (torch.from_numpy(a) for a in _valid_pairs(ctx))
    gen = torch.Generator().manual_seed(ctx.seed + dist.rank)
    net = dist.wrap(SeaterLoss(model, tables, cfg), find_unused_parameters=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_state, best_epoch, stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    history_log: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        sums = np.zeros(4)
        batches = _batches(history.shape[0], cfg.batch_size, rng)
        for idx in tqdm(batches, desc=f"seater epoch {epoch}/{cfg.epochs}", leave=False, mininterval=5.0):
            ids = torch.from_numpy(idx)
            total, gen_loss, ali, rnk = net(history[ids], target[ids], gen)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += [total.item(), gen_loss.item(), ali.item(), rnk.item()]
        sums = dist.all_reduce_mean(torch.from_numpy(sums / max(len(batches), 1))).double().numpy()
        valid_gen = _validation_loss(model, tables, cfg, v_hist, v_tgt) if dist.is_main else 0.0
        valid_gen = float(dist.broadcast(valid_gen))
        row = {
            "epoch": epoch,
            "loss": sums[0],
            "gen": sums[1],
            "ali": sums[2],
            "rank": sums[3],
            "valid_gen": valid_gen,
        }
        history_log.append(row)
        log.info(
            "seater %s",
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
        )
        if valid_gen < best_loss - 1e-4:
            best_loss, best_state, best_epoch, stale = valid_gen, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {
        "best_epoch": best_epoch,
        "best_valid_gen": best_loss,
        "epochs_run": len(history_log),
        "train_pairs": num_pairs,
        **({"world_size": dist.world_size} if dist.is_distributed else {}),
    }


@torch.no_grad()
def _validation_loss(
    model: SeaterModel, tables: TreeTables, cfg: SeaterConfig, hist: Tensor, tgt: Tensor
) -> float:
    if hist.shape[0] == 0:
        return float("nan")
    model.eval()
    plain = dataclasses.replace(cfg, align=False, rank=False)
    total, n = 0.0, 0
    for idx in _batches(hist.shape[0], 512, None):
        ids = torch.from_numpy(idx)
        total += seater_losses(model, tables, plain, hist[ids], tgt[ids]).gen.item() * len(idx)
        n += len(idx)
    return total / n


def train_seater(ctx: TrainContext) -> TrainedMethod:
    """SASRec embeddings -> balanced tree -> encoder-decoder training -> bundle -> served recommender."""
    cfg = SeaterConfig.load(ctx.config_overrides)
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    sasrec = ctx.sasrec()
    item_emb = np.asarray(sasrec.item_embeddings(), np.float32)  # [N+1, D]
    if item_emb.shape[1] != cfg.dim:
        raise ValueError(f"SEATER dim={cfg.dim} must equal the SASRec embedding size {item_emb.shape[1]}")
    t_sasrec = time.perf_counter() - t0

    t1 = time.perf_counter()
    dist = distributed.current()
    # rank 0's tree on every rank: the model's shapes follow it, and DDP needs them equal
    index = dist.broadcast(build_index(item_emb, cfg, ctx.seed) if dist.is_main else None)
    t_index = time.perf_counter() - t1
    log.info("seater index: %s", index.stats())

    t2 = time.perf_counter()
    model = SeaterModel(index, cfg, ctx.split.max_len)
    if cfg.init_from_sasrec:
        init_tokens_from_items(model, index, item_emb)
    tables = TreeTables.from_index(index)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        train_info = train_model(model, tables, cfg, ctx)
    finally:
        torch.set_num_threads(threads)
    t_train = time.perf_counter() - t2
    if not dist.is_main:  # rank 0 exports and serves; this rank's copy of the model is the same
        return TrainedMethod(recommender=sasrec, info={"rank": dist.rank, **train_info})

    bundle_dir = export_seater(ctx, cfg, model, index, sasrec, item_emb)
    recommender = BundleRecommender(bundle_dir, cfg.beam_size)
    info = {
        "sasrec_seconds": round(t_sasrec, 1),
        "index_seconds": round(t_index, 1),
        "train_seconds": round(t_train, 1),
        "levels": index.levels,
        "num_nodes": index.num_nodes,
        "beam_size": recommender.beam_size,
        "align": cfg.align,
        "rank": cfg.rank,
        **train_info,
    }
    return TrainedMethod(recommender=recommender, bundle_dir=bundle_dir, info=info)


def export_seater(
    ctx: TrainContext,
    cfg: SeaterConfig,
    model: SeaterModel,
    index: TreeIndex,
    sasrec: SASRec,
    item_emb: np.ndarray,
) -> Path:
    """Write the bundle: SEATER encoder + SASRec query in ``encoder.onnx``, the decoder step, the tree."""
    encoder = SeaterEncoder(model.encoder, SasrecQuery(sasrec.module)).eval()
    decoder = model.decoder.eval()
    counts = np.bincount(
        np.concatenate([np.asarray(s, np.int64) for s in ctx.split.train]), minlength=index.num_items + 1
    )
    counts[0] = 0
    return export_bundle(
        ctx.workdir / "seater",
        name="seater",
        method="seater",
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        item_ids=list(ctx.dataset.vocab.raw_ids),
        popularity=counts.astype(np.float32),
        score_mode="logprob",
        max_history=ctx.split.max_len,
        metrics={},
        config=dataclasses.asdict(cfg),
        dataset_fingerprint=ctx.dataset.fingerprint(),
    )


register_method("seater", train_seater)
