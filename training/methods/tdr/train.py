"""TDR trainer (Liu et al., "Deep Tree-based Retrieval for Efficient Recommendation: Theory and Method").

* Tree: balanced clustering of the SASRec item embeddings, one item per leaf, token scheme "node".
* Preference model ``f(u, n)`` (:class:`PreferenceModel`, the paper's DIN variant, sections 3.1 and 7):
  an activation unit ``MLP([a; a*w; w])`` weighs each recent history item ``a`` against the node
  embedding ``w``, the weighted items are summed per time window, and ``MLP([windows; w])`` gives one
  score. It is the bundle's decoder with score mode ``node`` (it ignores the prefix); the encoder's
  ``memory`` is the history's item embeddings.
* Training: a softmax over the nodes of every level (eq. 6-7), estimated by sampled softmax
  (eq. 17-18) with the uniform or the top-down sampler, optionally with the rectified labels of eq. 15
  (SASRec as the estimator of ``eta``); ``training/tdr_sampling.py``.
* Tree learning (section 6), alternated with training for ``tree_rounds`` rounds;
  ``training/tdr_tree_learning.py``. Validation Recall@20 is logged after every round and plotted.
* Serving: beam search with node scores, then the beam's items are reranked by the SASRec user vector
  (computed inside ``encoder.onnx``) against the SASRec item embeddings. The returned recommender
  serves from the exported bundle through ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from models.decoder import PAD_SCORE
from models.encoder import recency_positions
from models.index import TreeIndex
from training.bundle_recommender import BundleRecommender, SasrecQuery
from training.methods.tdr.sampling import (
    RECTIFY_MODES,
    children_table,
    level_sizes,
    rectified_weights,
    sampled_softmax_loss,
    topdown_negatives,
    uniform_negatives,
)
from training.registry import TrainContext, TrainedMethod, register_method

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).parents[2] / "configs" / "tdr.yaml"
SAMPLERS = ("uniform", "topdown")


@dataclass(frozen=True)
class TDRConfig:
    """Hyper-parameters; ``configs/tdr.yaml`` documents every one and the paper's values."""

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
    beam_size: int = 0  # 0 = the catalogue rule (models.beam_policy)
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
    def load(cls, overrides: dict[str, Any] | None = None, path: Path = CONFIG_PATH) -> TDRConfig:
        """The YAML defaults with ``overrides`` (``--set key=value``; strings are coerced)."""
        values: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown TDR config key(s) {unknown}; known: {sorted(known)}")
        values.update(tdr_overrides(overrides or {}, known))
        default = cls()
        cfg = cls(**{k: _coerce(k, v, getattr(default, k)) for k, v in values.items()})
        if "max_epochs" in (overrides or {}):  # the shorthand every method honours: caps the epochs
            cap = int(_coerce("max_epochs", (overrides or {})["max_epochs"], 0))
            cfg = dataclasses.replace(
                cfg, epochs=min(cfg.epochs, cap), round_epochs=min(cfg.round_epochs, cap)
            )
        return cfg


def tdr_overrides(overrides: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """The entries of a shared ``--set`` dict meant for TDR: ``tdr.<field>`` or a bare ``<field>``.

    Other namespaces (``sasrec.dim``) and the shared keys (``cache_dir``, ``max_epochs``) are left to
    their owners; an unknown ``tdr.`` key raises, an unknown bare key is logged (it may belong to
    another method of the same ``genret compare``).
    """
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        name = key[len("tdr.") :] if key.startswith("tdr.") else key
        if name in known:
            out[name] = value
        elif key.startswith("tdr."):
            raise ValueError(f"unknown TDR config key {key!r}; known: {sorted(known)}")
        elif "." not in key and key not in ("cache_dir", "max_epochs"):
            log.warning("TDR ignores --set %s (not a TDR config key)", key)
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    """A YAML or ``--set`` value as the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, tuple):
            parts = value if isinstance(value, list | tuple) else str(value).split(",")
            return tuple(int(p) for p in parts)
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"TDR config {key}={value!r} is not a {type(default).__name__}") from exc


# ---------------------------------------------------------------------------------------------- model
def window_matrix(windows: tuple[int, ...]) -> Tensor:
    """``[W, K']`` one-hot: recency position w (0 = newest) -> its time window."""
    out = torch.zeros(sum(windows), len(windows))
    start = 0
    for k, size in enumerate(windows):
        out[start : start + size, k] = 1.0
        start += size
    return out


class PreferenceModel(nn.Module):
    """The DIN-style node scorer ``f(u, n)`` with the decoder-step signature.

    ``forward(memory[B,T,D], memory_mask[B,T], beam_query[Bb], prefix[Bb,S], candidates[Bb,C]) -> [Bb,C]``;
    the prefix is ignored, padded candidates score ``PAD_SCORE``. ``memory`` is the history's item
    embeddings (any padding side); only the W most recent valid items are read.
    """

    def __init__(self, num_nodes: int, cfg: TDRConfig) -> None:
        super().__init__()
        D, h = cfg.dim, cfg.attention_hidden
        self.dim, self.hidden, self.window, self.num_windows = D, h, cfg.history_window, len(cfg.windows)
        self.node_embedding = nn.Embedding(num_nodes, D)
        window_of_slot = window_matrix(cfg.windows).argmax(dim=1)  # [W] time window of each recent slot
        self.window_of_slot: Tensor
        self.register_buffer("window_of_slot", window_of_slot, persistent=False)
        # activation unit (eq. 26): its first layer on [a; a*w; w], kept as its three blocks
        self.att_item = nn.Linear(D, h)
        self.att_product = nn.Linear(D, h, bias=False)
        self.att_node = nn.Linear(D, h, bias=False)
        self.att_act = nn.PReLU()
        self.att_out = nn.Linear(h, 1)
        self.att_out_act = nn.PReLU()
        # preference MLP on [window sums (K' D); node (D)]
        self.mlp_in = nn.Linear((self.num_windows + 1) * D, cfg.mlp_hidden[0])
        layers: list[nn.Module] = [nn.PReLU()]
        for width, hidden in zip(cfg.mlp_hidden[:-1], cfg.mlp_hidden[1:], strict=True):
            layers += [nn.Linear(width, hidden), nn.PReLU()]
        layers.append(nn.Linear(cfg.mlp_hidden[-1], 1))
        self.mlp_rest = nn.Sequential(*layers)

    def recent(self, memory: Tensor, memory_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``memory[B,T,D], mask[B,T] -> (recent[B,W,D] newest first, recent_mask[B,W])``."""
        mask = memory_mask.bool()
        rank = recency_positions(mask)  # [B, T] 0 = newest
        slots = torch.arange(self.window, device=memory.device)  # [W]
        pick = (rank[:, :, None] == slots[None, None, :]) & mask[:, :, None]  # [B, T, W]
        recent = torch.matmul(pick.transpose(1, 2).to(memory.dtype), memory)  # [B, W, D]
        return recent, pick.to(memory.dtype).sum(dim=1) > 0

    def attention(self, recent: Tensor, recent_mask: Tensor, w: Tensor) -> Tensor:
        """Activation unit: ``recent[K,W,D], recent_mask[K,W], nodes w[K,C,D] -> weights[K,C,W]``.

        ``(a * w) . P_h = w . (a * P_h)``: the product block is one batched matmul of the nodes with a
        per-user tensor ``[K, D, W*h]``, so no ``[K, C, W, D]`` intermediate is formed.
        """
        K, W, D = recent.shape
        C, h = w.shape[1], self.hidden
        per_user = recent.transpose(1, 2)[:, :, :, None] * self.att_product.weight.t()[None, :, None, :]
        x = torch.bmm(w, per_user.reshape(K, D, W * h)).reshape(K, C, W, h)  # [K, C, W, h]
        x = x + self.att_item(recent)[:, None, :, :] + self.att_node(w)[:, :, None, :]
        weight = self.att_out_act(self.att_out(self.att_act(x)))[..., 0]  # [K, C, W]
        return weight * recent_mask[:, None, :].to(weight.dtype)

    def score(self, recent: Tensor, recent_mask: Tensor, candidates: Tensor) -> Tensor:
        """``recent[K,W,D], recent_mask[K,W], candidates[K,C] -> scores[K,C]`` (one user row per k).

        The first MLP layer on ``[z_1 .. z_K'; w]`` with ``z_n = sum_{t in window n} weight_t a_t``
        (eq. 27) is applied without forming the window sums: its window-``n`` block ``U_n`` gives
        ``U_n z_n = sum_t weight_t (U_n a_t)``, one ``[K, C, W] x [K, W, H]`` matmul.
        """
        D, Kw = self.dim, self.num_windows
        w = self.node_embedding(candidates.clamp(min=0))  # [K, C, D]
        weight = self.attention(recent, recent_mask, w)  # [K, C, W]
        blocks = self.mlp_in.weight[:, : Kw * D].reshape(-1, Kw, D)  # [H, K', D]
        per_slot = blocks[:, self.window_of_slot, :]  # [H, W, D] block of each recent slot
        projected = torch.einsum("kwd,hwd->kwh", recent, per_slot)  # [K, W, H]
        node_part = nn.functional.linear(w, self.mlp_in.weight[:, Kw * D :], self.mlp_in.bias)  # [K, C, H]
        hidden = torch.bmm(weight, projected) + node_part  # [K, C, H]
        scores = self.mlp_rest(hidden)[..., 0]  # [K, C]
        return scores.masked_fill(candidates < 0, PAD_SCORE)

    def score_reference(self, recent: Tensor, recent_mask: Tensor, candidates: Tensor) -> Tensor:
        """The same score written as the paper does (window sums, concatenation, MLP); for tests."""
        w = self.node_embedding(candidates.clamp(min=0))  # [K, C, D]
        x = (
            self.att_item(recent)[:, None, :, :]
            + self.att_node(w)[:, :, None, :]
            + self.att_product(recent[:, None, :, :] * w[:, :, None, :])
        )  # [K, C, W, h]
        weight = self.att_out_act(self.att_out(self.att_act(x)))[..., 0] * recent_mask[:, None, :]
        onehot = nn.functional.one_hot(self.window_of_slot, self.num_windows).to(w.dtype)  # [W, K']
        pooled = torch.einsum("kcw,wn,kwd->kcnd", weight, onehot, recent)  # [K, C, K', D] (eq. 27)
        features = torch.cat([pooled.flatten(2), w], dim=-1)  # [K, C, (K'+1) D]
        scores = self.mlp_rest(self.mlp_in(features))[..., 0]
        return scores.masked_fill(candidates < 0, PAD_SCORE)

    def forward(
        self, memory: Tensor, memory_mask: Tensor, beam_query: Tensor, prefix: Tensor, candidates: Tensor
    ) -> Tensor:
        recent, recent_mask = self.recent(memory, memory_mask)  # [B, W, D], [B, W]
        return self.score(recent[beam_query], recent_mask[beam_query], candidates)


class TDREncoder(nn.Module):
    """``(history[B,T], mask[B,T]) -> (memory[B,T,D] item embeddings, query[B,Dr] rerank vector)``."""

    def __init__(self, item_embedding: nn.Embedding, query_model: nn.Module) -> None:
        super().__init__()
        self.item_embedding = item_embedding
        self.query_model = query_model

    def forward(self, history: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = history_mask.bool() & (history > 0)  # [B, T]
        memory = self.item_embedding(history * mask.to(history.dtype)) * mask[..., None].to(torch.float32)
        return memory, self.query_model(history, mask)


class TDRModel(nn.Module):
    """Item embeddings (the user side) + the preference model (the node side)."""

    def __init__(self, num_items: int, num_nodes: int, cfg: TDRConfig) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.scorer = PreferenceModel(num_nodes, cfg)

    def recent(self, histories: Tensor) -> tuple[Tensor, Tensor]:
        """``histories[K,T]`` (0 = padding) -> ``(recent[K,W,D], recent_mask[K,W])``."""
        mask = histories > 0
        memory = self.item_embedding(histories) * mask[..., None].to(torch.float32)  # [K, T, D]
        return self.scorer.recent(memory, mask)

    def score_histories(self, histories: Tensor, candidates: Tensor) -> Tensor:
        """``histories[K,T], candidates[K,C] -> [K,C]`` (tree learning's scorer)."""
        recent, recent_mask = self.recent(histories)
        return self.scorer.score(recent, recent_mask, candidates)


def init_from_item_embeddings(model: TDRModel, index: TreeIndex, item_emb: np.ndarray, dim: int) -> None:
    """Item rows = the top-``dim`` principal components of ``item_emb [N+1, Ds]`` (scaled to unit RMS);
    node rows = the mean of the items below each node (leaves: their item)."""
    x = torch.from_numpy(np.asarray(item_emb, np.float32))[1:]  # [N, Ds]
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: [Ds, Ds]
    k = min(dim, v.shape[0])
    proj = torch.zeros(x.shape[0] + 1, dim)
    proj[1:, :k] = x @ v[:k].T  # [N, k]
    proj = proj / proj[1:].pow(2).mean().sqrt().clamp(min=1e-6)
    nodes = torch.zeros(index.num_nodes, dim)
    counts = torch.zeros(index.num_nodes)
    path = torch.from_numpy(index.item_path[1:].astype(np.int64))  # [N, L]
    for level in range(index.levels):
        nodes.index_add_(0, path[:, level], proj[1:])
        counts.index_add_(0, path[:, level], torch.ones(path.shape[0]))
    nodes[0] = proj[1:].mean(dim=0)
    counts[0] = 1.0
    with torch.no_grad():
        model.item_embedding.weight.copy_(proj)
        model.scorer.node_embedding.weight.copy_(nodes / counts.clamp(min=1.0)[:, None])


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TreeTensors:
    """The index as the trainer reads it: paths, levels and dense children."""

    item_path: Tensor  # [N+1, L] int64 global node ids (row 0 = -1)
    levels: list[tuple[int, int]]  # (first global id, count) per level 1..L
    children: Tensor  # [num_nodes, C] int64, -1 padded

    @classmethod
    def from_index(cls, index: TreeIndex) -> TreeTensors:
        path = torch.from_numpy(index.item_path.astype(np.int64))
        return cls(
            item_path=path,
            levels=level_sizes(path, index.levels),
            children=children_table(index.child_offsets, index.child_ids, index.max_branching),
        )


def build_index(item_emb: np.ndarray, cfg: TDRConfig, seed: int) -> tuple[TreeIndex, np.ndarray]:
    """Initial tree: balanced k-ary clustering of the item embeddings, one item per leaf."""
    from training.clustering import balanced_tree_codes

    codes = balanced_tree_codes(item_emb, cfg.branching, seed=seed, iters=cfg.kmeans_iters)
    index = TreeIndex.from_codes(codes, cfg.branching, token_scheme="node")
    index.validate()
    if index.num_leaves != index.num_items:
        raise ValueError(
            f"TDR needs one item per leaf, got {index.num_leaves} leaves for {index.num_items} items"
        )
    return index, np.asarray(codes, np.int64)


def batch_loss(
    model: TDRModel,
    tree: TreeTensors,
    cfg: TDRConfig,
    histories: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    """Sampled-softmax loss of one batch, summed over levels (eq. 20), averaged over examples.

    histories: [B, T] (0 = padding); targets: [B] dense ids; weights: [B, L] rectified labels or None.
    """
    b, L, m = targets.shape[0], len(tree.levels), cfg.num_negatives
    recent, recent_mask = model.recent(histories)  # [B, W, D], [B, W]
    pos = tree.item_path[targets]  # [B, L]
    if cfg.sampler == "uniform":
        neg, log_q, valid = uniform_negatives(pos, tree.levels, m, generator)  # [B, L, m] each
    else:

        def score_pairs(users: Tensor, cand: Tensor) -> Tensor:
            return model.scorer.score(recent[users], recent_mask[users], cand)

        neg, log_q = topdown_negatives(score_pairs, tree.children, b, L, m, generator)  # [B, L, m]
        valid = neg != pos[:, :, None]  # accidental hits of the positive are dropped
    cand = torch.cat([pos[:, :, None], neg], dim=2).reshape(b, L * (1 + m))  # [B, L(1+m)]
    scores = model.scorer.score(recent, recent_mask, cand).reshape(b * L, 1 + m)  # [B*L, 1+m]
    w = weights.reshape(b * L) if weights is not None else None
    loss = sampled_softmax_loss(
        scores[:, 0], scores[:, 1:], log_q.reshape(b * L, m), neg_valid=valid.reshape(b * L, m), weights=w
    )
    return loss * L  # sum over levels, mean over examples


@torch.no_grad()
def rectified_labels(
    sasrec: Any,
    histories: np.ndarray,
    targets: np.ndarray,
    item_path: Tensor,
    mode: str = "hard",
    batch_size: int = 1024,
) -> Tensor:
    """Eq. 15 weights ``[P, L]`` of every training pair, SASRec's logits standing in for ``eta``."""
    out = []
    for start in tqdm(range(0, len(targets), batch_size), desc="tdr rectified labels", leave=False):
        rows = [h[h > 0] for h in histories[start : start + batch_size]]
        scores = sasrec.score_items(rows)  # [b, N+1]
        t = torch.from_numpy(targets[start : start + batch_size])
        out.append(rectified_weights(scores, t, item_path, mode))
    return torch.cat(out) if out else torch.zeros((0, item_path.shape[1]))


def train_epochs(
    model: TDRModel,
    tree: TreeTensors,
    cfg: TDRConfig,
    histories: np.ndarray,
    targets: np.ndarray,
    weights: Tensor | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: int,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> list[float]:
    """Run ``epochs`` epochs; returns the mean loss of each."""
    losses = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(targets))
        total, steps = 0.0, 0
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"tdr epoch {epoch + 1}/{epochs}", leave=False)
        for start in bar:
            idx = order[start : start + cfg.batch_size]
            w = weights[torch.from_numpy(idx)] if weights is not None else None
            loss = batch_loss(
                model,
                tree,
                cfg,
                torch.from_numpy(histories[idx]),
                torch.from_numpy(targets[idx]),
                w,
                generator,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{total / steps:.3f}")
        scheduler.step()
        losses.append(total / max(steps, 1))
        log.info("tdr epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses


def tree_learning_pairs(
    histories: np.ndarray, targets: np.ndarray, per_item: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``per_item`` pairs per target item (the last ones in pair order)."""
    order = np.argsort(targets, kind="stable")  # [P] grouped by item, pair order kept inside a group
    group_end = np.searchsorted(targets[order], targets[order], side="right")  # [P]
    keep = np.sort(order[(group_end - np.arange(len(order))) <= per_item])
    return histories[keep], targets[keep]


def export_tdr(
    ctx: TrainContext, cfg: TDRConfig, model: TDRModel, index: TreeIndex, sasrec: Any, out_dir: Path
) -> Path:
    from training.export import export_bundle

    encoder = TDREncoder(model.item_embedding, SasrecQuery(sasrec.module)).eval()
    counts = np.bincount(
        np.concatenate([np.asarray(s, np.int64) for s in ctx.split.train]), minlength=index.num_items + 1
    )
    counts[0] = 0
    return export_bundle(
        out_dir,
        name="tdr",
        method="tdr",
        encoder=encoder,
        decoder=model.scorer.eval(),
        index=index,
        item_emb=np.asarray(sasrec.item_embeddings(), np.float32),
        item_ids=list(ctx.dataset.vocab.raw_ids),
        popularity=counts.astype(np.float32),
        score_mode="node",
        max_history=ctx.split.max_len,
        metrics={},
        config={**dataclasses.asdict(cfg), "variant": cfg.variant},
        dataset_fingerprint=ctx.dataset.fingerprint(),
    )


def plot_rounds(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([r["round"] for r in rounds], [r["valid_recall@20"] for r in rounds], marker="o")
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xlabel("tree-learning round (0 = initial tree)")
    ax.set_ylabel("validation Recall@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_tdr(ctx: TrainContext) -> TrainedMethod:
    cfg = TDRConfig.load(ctx.config_overrides)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_tdr(ctx, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_tdr(ctx: TrainContext, cfg: TDRConfig) -> TrainedMethod:
    from training.evaluation import evaluate_recommender
    from training.methods.tdr.tree_learning import learn_tree
    from training.splits import training_pairs

    torch.manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    out_root = ctx.workdir / "tdr"
    t0 = time.perf_counter()
    sasrec = ctx.sasrec()
    item_emb = np.asarray(sasrec.item_embeddings(), np.float32)  # [N+1, Ds]
    t_sasrec = time.perf_counter() - t0

    t1 = time.perf_counter()
    index, codes = build_index(item_emb, cfg, ctx.seed)
    log.info("tdr index: %s", {k: v for k, v in index.stats().items() if k != "per_level"})
    model = TDRModel(index.num_items, index.num_nodes, cfg)
    if cfg.init_from_sasrec:
        init_from_item_embeddings(model, index, item_emb, cfg.dim)
    full_histories, targets = training_pairs(ctx.split.train, ctx.split.max_len)  # [P, T], [P]
    if cfg.max_train_pairs and len(targets) > cfg.max_train_pairs:
        keep = np.sort(rng.choice(len(targets), cfg.max_train_pairs, replace=False))
        full_histories, targets = full_histories[keep], targets[keep]
    histories = np.ascontiguousarray(full_histories[:, -cfg.history_window :])  # [P, W] what f reads
    tl_hist, tl_tgt = tree_learning_pairs(histories, targets, cfg.tree_pairs_per_item)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    t_setup = time.perf_counter() - t1

    rounds: list[dict[str, Any]] = []
    t_train = t_tree = t_eval = 0.0
    for r in range(cfg.tree_rounds + 1):
        if r > 0:
            t = time.perf_counter()
            codes, stats = learn_tree(index, codes, model.score_histories, tl_hist, tl_tgt, cfg.tree_step)
            new_index = TreeIndex.from_codes(codes, cfg.branching, token_scheme="node")
            if not np.array_equal(new_index.level_offsets, index.level_offsets):
                raise RuntimeError("tree learning changed the tree's shape; node embeddings would not match")
            index = new_index
            t_tree += time.perf_counter() - t
        else:
            stats = {"moved": 0.0}
        tree = TreeTensors.from_index(index)
        t = time.perf_counter()
        weights = (
            rectified_labels(sasrec, full_histories, targets, tree.item_path, cfg.rectify_mode)
            if cfg.rectify
            else None
        )
        if weights is not None:
            log.info("rectified labels: share of pairs kept per level %s", weights.mean(dim=0).tolist())
        epochs = cfg.epochs if r == 0 else cfg.round_epochs
        losses = train_epochs(
            model, tree, cfg, histories, targets, weights, optimizer, scheduler, epochs, rng, generator
        )
        t_train += time.perf_counter() - t
        t = time.perf_counter()
        bundle_dir = export_tdr(ctx, cfg, model, index, sasrec, out_root / f"round{r}")
        valid = evaluate_recommender(
            BundleRecommender(bundle_dir, cfg.beam_size), ctx.split.valid, ks=(20,), limit=cfg.eval_users
        )
        t_eval += time.perf_counter() - t
        entry: dict[str, Any] = {
            "round": r,
            "valid_recall@20": valid["recall@20"],
            "valid_ndcg@20": valid["ndcg@20"],
            "moved": stats["moved"],
            "tree_learning": stats,
            "loss": losses[-1] if losses else float("nan"),
            "bundle": str(bundle_dir),
        }
        rounds.append(entry)
        log.info(
            "%s round %d: valid recall@20 %.4f ndcg@20 %.4f (items moved by tree learning %.1f%%, loss %.4f)",
            cfg.variant,
            r,
            entry["valid_recall@20"],
            entry["valid_ndcg@20"],
            100 * entry["moved"],
            entry["loss"],
        )
    best = max(rounds, key=lambda e: e["valid_recall@20"])
    (out_root / "rounds.json").write_text(json.dumps(rounds, indent=2))
    plot_path = out_root / "tree_learning.png"
    plot_rounds(rounds, plot_path, f"{cfg.variant} on {ctx.dataset.name}")
    best_dir = Path(best["bundle"])
    info = {
        "variant": cfg.variant,
        "sasrec_seconds": round(t_sasrec, 1),
        "setup_seconds": round(t_setup, 1),
        "train_seconds": round(t_train, 1),
        "tree_learning_seconds": round(t_tree, 1),
        "round_eval_seconds": round(t_eval, 1),
        "train_pairs": len(targets),
        "levels": index.levels,
        "num_nodes": index.num_nodes,
        "beam_size": cfg.beam_size,
        "round_valid_recall@20": [round(e["valid_recall@20"], 4) for e in rounds],
        "best_round": best["round"],
        "plot": str(plot_path),
    }
    return TrainedMethod(
        recommender=BundleRecommender(best_dir, cfg.beam_size), bundle_dir=best_dir, info=info
    )


register_method("tdr", train_tdr)
