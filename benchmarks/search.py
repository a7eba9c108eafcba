"""``genret bench search`` and ``genret bench cluster``: the index's two hot paths against in-run baselines.

``bench search``: one decoder (:class:`models.nets.decoder.TokenDecoder`, untrained, eval mode), one
trie, one batch of encoder states; :func:`models.search.beam.beam_search` (all beams of all queries
flattened, one decoder call per level) against constrained decoding as GENRE and Hugging Face
``prefix_allowed_tokens_fn`` do it: a Python dict trie asked per beam per step for the allowed
next tokens, a mask over the full vocabulary built from its answer, beam search one query at a
time. Both normalise over the allowed tokens (log-softmax of the masked logits), so they must
return the same leaves; the bench checks it. Our search runs the serving decoder step
(:meth:`TokenDecoder.step`); :mod:`benchmarks.step` times that step per level against
the reference step and this CPU's matrix-product limit. Then the cost of our search against
catalogue size.

``bench cluster``: :mod:`benchmarks.cluster`. Both are registered by :mod:`cli.bench_compute`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.step import print_step_report, run_step_bench
from benchmarks.step_runs import timed
from models.index import TreeIndex
from models.nets.decoder import DecoderConfig, TokenDecoder, TokenScheme
from models.search.beam import DeviceTrie
from models.search.staged import beam_search


# ---------------------------------------------------------------------------- fixtures
def balanced_codes(num_items: int, k: int, levels: int) -> np.ndarray:
    """Codes ``[N+1, L]`` of a synthetic balanced tree: items in id order, every cluster of n items
    cut into ``min(n, k)`` contiguous runs whose sizes differ by at most one."""
    codes = np.full((num_items + 1, levels), -1, np.int64)
    group = np.zeros(num_items, np.int64)
    for level in range(levels):
        sizes = np.bincount(group)
        starts = np.cumsum(sizes) - sizes
        pos = np.arange(num_items) - starts[group]  # items are sorted by group at every level
        n = sizes[group]
        codes[1:, level] = pos * np.minimum(n, k) // n
        group = np.unique(group * k + codes[1:, level], return_inverse=True)[1].reshape(-1)
    return codes


def levels_for(num_items: int, k: int) -> int:
    levels = 1
    while k**levels < num_items:
        levels += 1
    return levels


class DecoderModel:
    """The real decoder step (:class:`TokenDecoder`) over fixed encoder states, seen three ways: as
    our scorer (``step``: the serving step, candidates only, a :class:`models.search.beam.StepScorer`),
    as the reference step (``reference``: the whole prefix every level) and as a language model over
    the full vocabulary (``vocab_logits``: ``h @ table.T + bias``, what GENRE / HF beam search consume)."""

    name = "TokenDecoder (2 layers, D=64)"

    def __init__(self, decoder: TokenDecoder, memory: Tensor, memory_mask: Tensor) -> None:
        self.decoder, self.memory, self.memory_mask = decoder, memory, memory_mask
        with torch.inference_mode():
            self.memory_state = decoder.memory_state(memory)  # tensors [B, D, T], once (as the service does)
        self.cache_width = decoder.cache_width
        self.vocab_id = decoder.node_row  # [num_nodes] output row of every node
        self.table = decoder.token_embedding(torch.arange(decoder.num_rows))  # [V, D]
        self.bias = decoder.bias if decoder.bias is not None else torch.zeros(decoder.num_rows)

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.decoder.step(self.memory_state, self.memory_mask, beam_query, prefix, candidates, cache)

    def reference(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        return self.decoder(self.memory, self.memory_mask, beam_query, prefix, candidates)

    def vocab_logits(self, beam_query: Tensor, prefix: Tensor) -> Tensor:
        h = self.decoder.hidden(self.memory, self.memory_mask, beam_query, prefix)  # [nb, D]
        return h @ self.table.T + self.bias  # [nb, V]


class TableModel:
    """A near-free scorer: a fixed ``[B, V]`` table of logits per query (ignores the prefix). It
    isolates the cost of the search machinery itself (trie, masks, top-k, bookkeeping)."""

    name = "logit table (search only)"

    def __init__(self, logits: Tensor, vocab_id: Tensor) -> None:
        self.logits, self.vocab_id = logits, vocab_id  # [B, V], [num_nodes]

    def __call__(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        return self.logits[beam_query[:, None], self.vocab_id[candidates.clamp(min=0)]]  # [Bb, C]

    def vocab_logits(self, beam_query: Tensor, prefix: Tensor) -> Tensor:
        return self.logits[beam_query]  # [nb, V]


Model = DecoderModel | TableModel


@dataclass(frozen=True)
class SearchSetup:
    index: TreeIndex
    trie: DeviceTrie
    models: tuple[Model, ...]  # (decoder, dot)
    batch: int


def make_setup(
    num_items: int,
    k: int,
    levels: int,
    batch: int,
    dim: int,
    seed: int,
    token_scheme: TokenScheme = "level",
    memory_len: int = 20,
) -> SearchSetup:
    index = TreeIndex.from_codes(balanced_codes(num_items, k, levels), k, token_scheme)
    torch.manual_seed(seed)
    decoder = TokenDecoder(
        DecoderConfig(dim=dim, num_layers=2, num_heads=2, dropout=0.0, token_scheme=token_scheme),
        index.node_token,
        index.level_offsets,
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, memory_len, dim, generator=gen)  # [B, T, D] stands for the encoder states
    memory_mask = torch.ones(batch, memory_len, dtype=torch.bool)
    table = TableModel(torch.randn(batch, decoder.num_rows, generator=gen), decoder.node_row)
    return SearchSetup(
        index, DeviceTrie.from_index(index), (DecoderModel(decoder, memory, memory_mask), table), batch
    )


# ---------------------------------------------------------------------------- the GENRE / HF baseline
class DictTrie:
    """GENRE's ``Trie``: nested dicts keyed by vocabulary id (the decoder's output row of a node);
    an entry also keeps the node's global id so that the same decoder (which embeds prefix nodes)
    can be fed."""

    def __init__(self, index: TreeIndex, vocab_id: np.ndarray) -> None:
        self.root: dict[int, tuple[int, dict]] = {}  # vocabulary id -> (global node id, children)
        tokens = vocab_id  # [num_nodes]
        for path in index.item_path[1:].tolist():
            level = self.root
            for node in path:
                entry = level.setdefault(int(tokens[node]), (node, {}))
                level = entry[1]

    def get(self, prefix_tokens: tuple[int, ...]) -> dict[int, tuple[int, dict]]:
        level = self.root
        for token in prefix_tokens:
            level = level[token][1]
        return level


def genre_search(model: Model, levels: int, batch: int, trie: DictTrie, beam: int) -> list[list[int]]:
    """Per query beam search with ``prefix_allowed_tokens_fn``-style masking over the full vocabulary."""
    out = []
    for q in range(batch):
        beams: list[tuple[tuple[int, ...], list[int], float]] = [((), [0], 0.0)]  # tokens, node path, score
        for _level in range(levels):
            prefix = torch.tensor([nodes for _, nodes, _ in beams], dtype=torch.int64)  # [nb, S]
            beam_query = torch.full((len(beams),), q, dtype=torch.int64)
            logits = model.vocab_logits(beam_query, prefix)  # [nb, V]
            vocab = logits.shape[1]
            mask = torch.full((len(beams), vocab), float("-inf"))
            allowed_nodes: list[dict[int, int]] = []
            for row, (tokens, _, _) in enumerate(beams):
                allowed = trie.get(tokens)  # prefix_allowed_tokens_fn(batch_id, sent)
                mask[row, list(allowed)] = 0.0
                allowed_nodes.append({t: node for t, (node, _) in allowed.items()})
            logp = torch.log_softmax(logits + mask, dim=-1)  # [nb, V]
            total = torch.tensor([s for _, _, s in beams])[:, None] + logp
            top = torch.topk(total.reshape(-1), min(beam, int(torch.isfinite(total).sum())))
            new_beams = []
            for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                row, token = divmod(flat, vocab)
                tokens, nodes, _ = beams[row]
                new_beams.append(((*tokens, token), [*nodes, allowed_nodes[row][token]], score))
            beams = new_beams
        out.append([nodes[-1] for _, nodes, _ in beams])
    return out


def run_search_bench(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "timing": "process CPU time",
    }
    B, b, k, L = args.batch, args.beam, args.branching, args.levels
    report["setup"] = {"items": k**L, "branching": k, "levels": L, "beam": b, "batch": B}
    report["comparison"] = []
    for scheme in args.schemes:
        setup = make_setup(k**L, k, L, B, args.dim, args.seed, scheme, args.memory_len)
        if scheme == "level":
            report["step"] = run_step_bench(setup.models[0], setup.trie, args)
        dict_trie = DictTrie(setup.index, setup.models[0].vocab_id.numpy())
        # the full-vocabulary baseline costs O(num_nodes) per beam with node tokens: fewer queries
        nq = B if scheme == "level" else min(B, args.node_baseline_queries)
        for model in setup.models:
            with torch.inference_mode():
                ours_s, ours = timed(partial(beam_search, setup.trie, model, B, b, "logprob"), args.repeats)
                base_s, base = timed(partial(genre_search, model, L, nq, dict_trie, b), 1)
            ours_leaves = ours.leaves.tolist()[:nq]
            report["comparison"].append(
                {
                    "token_scheme": scheme,
                    "vocab": int(model.vocab_id.max()) + 1,
                    "scorer": model.name,
                    "ours_ms_per_query": 1e3 * ours_s / B,
                    "genre_ms_per_query": 1e3 * base_s / nq,
                    "speedup": (base_s / nq) / (ours_s / B),
                    "compared_queries": nq,
                    "same_leaf_sets": sum(set(o) == set(g) for o, g in zip(ours_leaves, base, strict=True)),
                    "same_leaf_order": sum(o == g for o, g in zip(ours_leaves, base, strict=True)),
                }
            )
    rows = []
    for n in args.sizes:
        depth = levels_for(n, k)
        s = make_setup(n, k, depth, B, args.dim, args.seed, memory_len=args.memory_len)
        row: dict[str, Any] = {"items": n, "levels": depth, "nodes": s.index.num_nodes}
        for key, model in zip(("decoder", "table"), s.models, strict=True):
            with torch.inference_mode():
                secs, _ = timed(partial(beam_search, s.trie, model, B, b, "logprob"), args.repeats)
            row[f"{key}_ms_per_batch"] = 1e3 * secs
            row[f"{key}_ms_per_level"] = 1e3 * secs / depth
        rows.append(row)
    report["scaling"] = rows
    return report


def print_search_report(report: dict[str, Any]) -> None:
    c = report["setup"]
    print(
        f"bench search: {c['items']} items, branching {c['branching']}, L={c['levels']}, beam {c['beam']}, "
        f"batch {c['batch']}, torch threads {report['torch_threads']}, {report['device']}, "
        f"times are {report['timing']} (median)"
    )
    print(
        f"{'tokens':<7}{'vocab':>8}  {'scorer':<30}{'GENRE/HF ms/q':>14}{'ours ms/q':>10}{'speedup':>9}"
        f"{'same leaves':>13}{'same order':>12}"
    )
    for r in report["comparison"]:
        n = r["compared_queries"]
        print(
            f"{r['token_scheme']:<7}{r['vocab']:>8}  {r['scorer']:<30}{r['genre_ms_per_query']:>14.3f}"
            f"{r['ours_ms_per_query']:>10.3f}{r['speedup']:>8.1f}x{r['same_leaf_sets']:>9}/{n:<3}"
            f"{r['same_leaf_order']:>8}/{n:<3}"
        )
    if "step" in report:
        print()
        print_step_report(report["step"])
    print()
    print("cost of our search against catalogue size (level tokens, same branching, batch, beam):")
    print(
        f"{'items':>10}{'levels':>8}{'nodes':>10}{'decoder ms/batch':>18}{'ms/level':>10}{'table ms/batch':>16}{'ms/level':>10}"
    )
    for r in report["scaling"]:
        print(
            f"{r['items']:>10}{r['levels']:>8}{r['nodes']:>10}{r['decoder_ms_per_batch']:>18.1f}"
            f"{r['decoder_ms_per_level']:>10.1f}{r['table_ms_per_batch']:>16.2f}{r['table_ms_per_level']:>10.2f}"
        )


def cmd_search(args: argparse.Namespace) -> int:
    """``genret bench search`` on the CPU (``--device``: :func:`benchmarks.search_device.cmd_search_device`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_search_bench(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_search_report(report)
    return 0
