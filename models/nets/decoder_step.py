"""The serving form of the decoder step: incremental, with cached prefix keys/values and the
cross-attention keys/values of the encoder memory computed once per search.

``prepare(memory[B,T,D]) -> memory_state`` (``n`` tensors ``[B,D,T]``) runs once per batch
(``decoder_memory.onnx``); ``step(memory_mask[B,T], beam_query[Bb], prefix[Bb,S], candidates[Bb,C],
cache[Bb,S-1,W], *memory_state) -> (scores[Bb,C], cache_out[Bb,1,W])`` runs at every level
(``decoder.onnx``).

* :class:`~models.nets.decoder.TokenDecoder`: ``memory_state`` is the cross-attention keys and values
  of every layer, ``n = 2 * num_layers`` tensors ordered ``[layer, (key, value)]``, each ``[B,D,T]``
  (feature-major: a free reshape gives the ``[B,H,hd,T]`` a query-key product reads, and the value
  product reads the same layout transposed). The ``[B*T, D] x [D, 2D]`` products a step used to
  repeat at every level are taken once, and a step reads each tensor whole, without a slice or a
  transpose (copies under ONNX Runtime). Stateless scorers (:class:`~models.nets.decoder.NodeScorer`,
  TDR) read the memory itself: ``n = 1``, the memory transposed (:class:`DecoderStep`).
* ``cache`` holds the per-position state of prefix positions ``0..S-2``; the step computes the
  last position only and returns its state in ``cache_out``. :func:`models.search.beam.beam_step`
  hands each child beam its parent's cache plus the parent's ``cache_out``.
  For :class:`~models.nets.decoder.TokenDecoder` the state of a position is the self-attention key
  and value of every layer, ``W = num_layers * 2 * D`` laid out ``[layer, (key, value), D]``.
  Stateless scorers have ``W = 0``.
* Beams are grouped by query: ``Bb = B * w`` and ``beam_query[i] = i // w`` (what the search
  passes). Cross-attention then runs as one batched product per query and head,
  ``[w, hd] x [hd, T]``, instead of gathering a ``[T, D]`` copy of the keys and values for every beam.
* With ``level`` tokens the candidates of a step are rows of one level of the token table: one
  ``[Bb, D] x [D, V]`` product and a gather replace the per-beam gather of ``C`` embedding rows.
* The reference :meth:`TokenDecoder.forward` (whole prefix, any ``beam_query``, raw memory) is what
  the trainers run; the tests hold ``prepare`` + ``step`` to it within float32 reordering.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def cached_self_attention(
    attn: nn.MultiheadAttention, h: Tensor, past_keys: Tensor, past_values: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention of one new position over the cached prefix.

    ``h[Bb,D], past_keys[Bb,P,D], past_values[Bb,P,D]`` (positions ``0..P-1``) ``-> (out[Bb,D],
    key[Bb,D], value[Bb,D])``: the new position's key and value are what the cache gains (the
    caller splits the cache and concatenates every layer's new state, one copy each way).
    With ``S = P+1 <= L+1`` keys per beam the products are tiny: elementwise products and sums
    over ``[Bb, S, H, hd]`` rather than a batched matrix product per beam. The query, key and value
    projections are three products, not one ``[D, 3D]`` product sliced three ways: under ONNX
    Runtime each slice is a copy, and the three weight slices are folded into constants at export.
    """
    Bb, D = h.shape
    P = past_keys.shape[1]
    H = attn.num_heads
    hd = D // H
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k_new, v_new = (
        F.linear(h, w[i * D : (i + 1) * D], b[i * D : (i + 1) * D] if b is not None else None)
        for i in range(3)
    )  # [Bb, D] each
    q = q.reshape(Bb, 1, H, hd)
    k_past = past_keys.reshape(Bb, P, H, hd)
    v_past = past_values.reshape(Bb, P, H, hd)
    logits = torch.cat([(k_past * q).sum(-1), (k_new.reshape(Bb, 1, H, hd) * q).sum(-1)], dim=1) * hd**-0.5
    weights = logits.softmax(dim=1)[..., None]  # [Bb, S, H, 1]
    out = (weights[:, :P] * v_past).sum(1) + weights[:, P] * v_new.reshape(Bb, H, hd)  # [Bb, H, hd]
    return attn.out_proj(out.reshape(Bb, D)), k_new, v_new


def grouped_cross_attention(
    attn: nn.MultiheadAttention, h: Tensor, keys: Tensor, values: Tensor, bias: Tensor
) -> Tensor:
    """Cross-attention of the beams of each query to that query's memory, one batched product per query.

    ``h[Bb,D]`` (beams grouped by query, ``Bb = B*w``), ``keys, values [B,D,T]``
    (:func:`memory_keys_values`), ``bias[B,1,1,T]`` (:func:`key_bias`) ``-> [Bb,D]``.
    """
    Bb, D = h.shape
    B, _, T = keys.shape
    H = attn.num_heads
    hd = D // H
    w_q = attn.in_proj_weight[:D]  # [D, D]
    b_q = attn.in_proj_bias[:D] if attn.in_proj_bias is not None else None
    q = (F.linear(h, w_q, b_q) * hd**-0.5).reshape(B, Bb // B, H, hd).transpose(1, 2)  # [B, H, w, hd]
    logits = q @ keys.reshape(B, H, hd, T) + bias  # [B, H, w, T]
    out = logits.softmax(dim=-1) @ values.reshape(B, H, hd, T).transpose(2, 3)  # [B, H, w, hd]
    return attn.out_proj(out.transpose(1, 2).reshape(Bb, D))


def key_bias(memory_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``memory_mask[B,T] -> [B,1,1,T]`` additive attention bias: 0 where a key is attended, -inf
    where blocked (as :func:`models.nets.decoder.safe_key_padding` says: an empty row keeps its last slot)."""
    valid = memory_mask.bool()
    T = valid.shape[1]
    last = torch.arange(T, device=valid.device)[None, :] == T - 1  # [1, T]
    keep = valid | (~valid.any(dim=1, keepdim=True) & last)  # [B, T]
    zeros = torch.zeros(keep.shape, dtype=dtype, device=valid.device)
    return zeros.masked_fill(~keep, float("-inf"))[:, None, None, :]


def take(table: Tensor, index: Tensor) -> Tensor:
    """``table[N, ...]`` rows at ``index[...]``. A 1-d table is read by ``gather`` (exported as
    ``GatherElements``, about 8x faster under ONNX Runtime than ``Gather`` for the ``[Bb*C]``
    candidate lookup of a step); a table of rows by ``index_select`` (faster than advanced indexing on CPU)."""
    flat = index.reshape(-1)
    if table.dim() == 1:
        return torch.gather(table, 0, flat).reshape(index.shape)
    return table.index_select(0, flat).reshape(*index.shape, *table.shape[1:])


def memory_keys_values(attn: nn.MultiheadAttention, memory: Tensor) -> tuple[Tensor, Tensor]:
    """``memory[B,T,D] -> (keys, values)`` each ``[B,D,T]`` contiguous: one layer's cross-attention
    keys and values, once per search, from one ``[B*T, D] x [D, 2D]`` product (the key and value
    rows of ``in_proj`` are adjacent; faster on CPU than ``B`` products written feature-major)."""
    B, T, D = memory.shape
    w, b = attn.in_proj_weight, attn.in_proj_bias
    kv = F.linear(memory.reshape(B * T, D), w[D:], b[D:] if b is not None else None)  # [B*T, 2D]
    kv = kv.reshape(B, T, 2 * D).transpose(1, 2)  # [B, 2D, T]
    return kv[:, :D].contiguous(), kv[:, D:].contiguous()


class DecoderStep(nn.Module):
    """Any decoder-step module in the serving form: :meth:`prepare` once per batch, then
    ``forward(memory_mask, beam_query, prefix, candidates, cache, *memory_state) -> (scores, cache_out)``.

    A module with ``memory_state`` and ``step`` methods (:class:`TokenDecoder`) runs them; any other
    module with the five-input signature is stateless: its memory state is the memory, transposed
    to ``[B,D,T]`` like every state tensor (``state_count = 1``), ``cache_width = 0`` and
    ``cache_out`` is ``[Bb, S-P, 0]``. This is the module ``decoder.onnx`` is exported from (and,
    through :class:`MemoryState`, ``decoder_memory.onnx``); :class:`~models.bundle.backend.TorchBackend` runs it.
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.cache_width = int(getattr(decoder, "cache_width", 0))
        self.state_count = int(getattr(decoder, "state_count", 1))

    def dims(self) -> dict[str, int]:
        """The manifest's decoder sizes: ``memory_states`` (tensors of the memory state), ``cache`` (W)."""
        return {"memory_states": self.state_count, "cache": self.cache_width}

    def prepare(self, memory: Tensor) -> tuple[Tensor, ...]:
        """``memory[B,T,D] -> memory_state``: ``state_count`` tensors ``[B,D,T]``, once per batch."""
        memory_state = getattr(self.decoder, "memory_state", None)
        if memory_state is not None:
            return tuple(memory_state(memory))
        return (memory.transpose(1, 2).contiguous(),)

    def forward(
        self,
        memory_mask: Tensor,
        beam_query: Tensor,
        prefix: Tensor,
        candidates: Tensor,
        cache: Tensor,
        *memory_state: Tensor,
    ) -> tuple[Tensor, Tensor]:
        step = getattr(self.decoder, "step", None)
        if step is not None:
            return step(memory_state, memory_mask, beam_query, prefix, candidates, cache)
        memory = memory_state[0].transpose(1, 2)  # [B, T, D]
        scores = self.decoder(memory, memory_mask, beam_query, prefix, candidates)  # [Bb, C]
        new = prefix.shape[1] - cache.shape[1]
        return scores, memory.new_zeros(prefix.shape[0], new, 0)  # [Bb, S-P, 0]


class MemoryState(nn.Module):
    """:meth:`DecoderStep.prepare` as a module's ``forward`` (what ``decoder_memory.onnx`` is exported from)."""

    def __init__(self, step: DecoderStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, memory: Tensor) -> tuple[Tensor, ...]:
        return self.step.prepare(memory)
