"""SASRec: a causal Transformer over the history, scored against its own (tied) item embeddings.

The user vector is the encoder output at the most recent history position; an item's score is
its inner product with the user vector. Training lives in :mod:`training.methods.sasrec.train`, the cache in :mod:`.cache`;
this module holds the model, the batching of histories and the :class:`SASRec` wrapper that
other methods use (item embeddings, user vectors, full-catalogue scores).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from training.methods.sasrec.config import SASRecConfig

WEIGHTS_FILE = "model.safetensors"
META_FILE = "sasrec.json"
INIT_STD = 0.02  # embeddings start small so that Adam's steps move them quickly (BERT / RecBole habit)


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, ffn_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        inner = ffn_dim or dim
        self.ffn = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``attn_mask [B, 1, T, T]`` (True = may attend) -> ``[B, T, D]``."""
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)  # [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, T, Dh]
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRecModule(nn.Module):
    """``forward(history [B, T]) -> hidden [B, T, D]``; histories are left-padded with 0."""

    def __init__(self, num_items: int, max_len: int, config: SASRecConfig) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, config.dim)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(config.dim, config.heads, config.dropout, config.ffn_mult * config.dim)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.item_emb.weight, std=INIT_STD)
        nn.init.normal_(self.pos_emb.weight, std=INIT_STD)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        t = history.shape[1]
        if t > self.max_len:
            raise ValueError(f"history length {t} exceeds the model's max_len {self.max_len}")
        valid = history > 0  # [B, T]
        positions = torch.arange(self.max_len - t, self.max_len, device=history.device)  # last item at T-1
        x = self.item_emb(history) + self.pos_emb(positions)[None]  # [B, T, D]
        x = self.emb_drop(x) * valid[..., None]
        causal = torch.ones(t, t, dtype=torch.bool, device=history.device).tril()  # [T, T]
        diag = torch.eye(t, dtype=torch.bool, device=history.device)
        attn_mask = ((causal & valid[:, None, :]) | diag)[:, None]  # [B, 1, T, T]; pad rows see themselves
        for block in self.blocks:
            x = block(x, attn_mask) * valid[..., None]
        return self.norm(x)  # [B, T, D]

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D] -> [..., N+1]`` inner products with every item; column 0 is -inf."""
        logits = hidden @ self.item_emb.weight.T
        logits[..., 0] = float("-inf")
        return logits


def pad_histories(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """The ``max_len`` most recent items of each history, left-padded with 0 -> ``[B, T']``."""
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int64)[-width:]
        if len(recent):
            out[row, width - len(recent) :] = recent
    return torch.from_numpy(out)


def top_k_excluding(scores: torch.Tensor, k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
    """Best ``k`` item ids per row of ``scores [B, N+1]`` (column 0 and excluded items never chosen).

    Returns ``[B, k]`` dense ids, 0 where fewer than ``k`` items are left.
    """
    scores = scores.clone().float()
    scores[:, 0] = float("-inf")
    if exclude is not None:
        for row, items in enumerate(exclude):
            if len(items):
                seen = torch.as_tensor(np.asarray(items, dtype=np.int64), device=scores.device)
                scores[row, seen] = float("-inf")
    width = min(k, scores.shape[1])
    values, ids = torch.topk(scores, width, dim=1)
    ids[torch.isinf(values) & (values < 0)] = 0
    out = np.zeros((scores.shape[0], k), dtype=np.int64)
    out[:, :width] = ids.cpu().numpy()
    return out


class SASRec:
    """A trained SASRec: user vectors, item embeddings, scores and top-K recommendations."""

    def __init__(
        self, module: SASRecModule, config: SASRecConfig, info: dict[str, Any] | None = None
    ) -> None:
        self.module = module.eval()
        self.config = config
        self.info: dict[str, Any] = dict(info or {})

    @property
    def num_items(self) -> int:
        return self.module.num_items

    @property
    def max_len(self) -> int:
        return self.module.max_len

    @property
    def dim(self) -> int:
        return self.config.dim

    def item_embeddings(self) -> np.ndarray:
        """``[N+1, D]`` float32, row 0 = 0."""
        emb = self.module.item_emb.weight.detach().cpu().numpy().astype(np.float32, copy=True)
        emb[0] = 0.0
        return emb

    @torch.no_grad()
    def _user_vectors(self, histories: list[np.ndarray], batch_size: int = 1024) -> torch.Tensor:
        """``[B, D]`` on the module's device (a GPU while it trains there)."""
        self.module.eval()
        device = self.module.item_emb.weight.device
        outs: list[torch.Tensor] = [torch.zeros(0, self.config.dim, device=device)]
        for start in range(0, len(histories), batch_size):
            batch = pad_histories(histories[start : start + batch_size], self.max_len)  # [B, T']
            outs.append(self.module(batch.to(device))[:, -1])  # [B, D]
        return torch.cat(outs)

    def encode(self, histories: list[np.ndarray]) -> np.ndarray:
        """User vectors ``[B, D]`` (float32) of time-ordered histories (the max_len most recent kept)."""
        return self._user_vectors(histories).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def score_items(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Logits ``[B, N+1]`` over the catalogue (column 0 = -inf)."""
        return self.module.item_logits(self._user_vectors(histories))

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        """Brute-force inner-product top-``k`` ``[B, k]``; 0 where fewer items are left."""
        out = [np.zeros((0, k), dtype=np.int64)]
        for start in range(0, len(histories), 1024):
            rows = histories[start : start + 1024]
            excl = exclude[start : start + 1024] if exclude is not None else None
            out.append(top_k_excluding(self.score_items(rows), k, excl))
        return np.concatenate(out)

    def save(self, directory: str | Path) -> Path:
        """Weights as safetensors plus a JSON with the config, sizes and training info."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.module.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        meta = {
            "config": asdict(self.config),
            "num_items": self.num_items,
            "max_len": self.max_len,
            "info": self.info,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SASRec:
        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{directory} holds no saved SASRec ({META_FILE} + {WEIGHTS_FILE})")
        meta = json.loads(meta_path.read_text())
        config = SASRecConfig(**meta["config"])
        module = SASRecModule(int(meta["num_items"]), int(meta["max_len"]), config)
        module.load_state_dict(load_file(str(weights_path)))
        return cls(module, config, meta.get("info", {}))
