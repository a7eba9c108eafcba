"""TDR's preference model ``f(u, n)`` (the paper's DIN variant), its encoder for the bundle, and the
initialisation of item and node embeddings from the SASRec item table."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from models.index import TreeIndex
from models.nets.decoder import PAD_SCORE
from models.nets.encoder import recency_positions
from training.methods.tdr.config import TDRConfig


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
