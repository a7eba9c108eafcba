"""``genret bench search --device D``: the search's cost against catalogue size on a device.

What ``bench search`` measures on the CPU in process time, measured here in wall time with the
device synchronised after every search (median of ``--repeats`` after one warm-up), on ``cpu`` or
``cuda[:i]``. Same setups (:func:`benchmarks.search.make_setup`: untrained
``TokenDecoder``, balanced tree, random encoder states), three scorers per size:

* ``step``: the serving decoder step (one new prefix position per level, cached keys/values);
* ``reference``: the full-prefix decoder (the whole prefix recomputed every level, the old path);
* ``table``: a fixed logit table (the cost of the search machinery alone).

The step and the reference must find the same leaves; the report counts the queries where they do.
The GENRE/HF per-query baseline and the CPU profiles stay CPU-only (plain ``bench search``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from benchmarks.search import DecoderModel, TableModel, levels_for, make_setup
from models.nets.decoder import TokenDecoder
from models.search.beam import BeamResult, DeviceTrie
from models.search.staged import beam_search


class StepScorer:
    """The serving step of ``decoder`` over fixed encoder states (a :class:`models.search.beam.StepScorer`)."""

    def __init__(self, decoder: TokenDecoder, memory: Tensor, memory_mask: Tensor) -> None:
        self.decoder, self.memory_mask = decoder, memory_mask
        self.memory_state = decoder.memory_state(memory)  # tensors [B, D, T], once per search
        self.cache_width = int(decoder.cache_width)

    def step(
        self, beam_query: Tensor, prefix: Tensor, candidates: Tensor, cache: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.decoder.step(self.memory_state, self.memory_mask, beam_query, prefix, candidates, cache)


class FullPrefixScorer:
    """The reference decoder step: ``decoder(memory, mask, beam_query, prefix, candidates)``."""

    def __init__(self, decoder: TokenDecoder, memory: Tensor, memory_mask: Tensor) -> None:
        self.decoder, self.memory, self.memory_mask = decoder, memory, memory_mask

    def __call__(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        return self.decoder(self.memory, self.memory_mask, beam_query, prefix, candidates)


class TableScorer:
    """Fixed ``[B, V]`` logits per query, ignoring the prefix."""

    def __init__(self, logits: Tensor, vocab_id: Tensor) -> None:
        self.logits, self.vocab_id = logits, vocab_id  # [B, V], [num_nodes]

    def __call__(self, beam_query: Tensor, prefix: Tensor, candidates: Tensor) -> Tensor:
        return self.logits[beam_query[:, None], self.vocab_id[candidates.clamp(min=0)]]  # [Bb, C]


def same(scorer: Any) -> Any:
    """A factory that returns one scorer for every search (one without per-search state)."""
    return scorer


def search_with(trie: DeviceTrie, make: Callable[[], Any], B: int, beam: int) -> BeamResult:
    """One search with a fresh scorer from ``make`` (its set-up counted in the search's time)."""
    return beam_search(trie, make(), B, beam, "logprob")


def wall_timed(fn: Callable[[], BeamResult], repeats: int, device: torch.device) -> tuple[float, BeamResult]:
    """Median wall seconds over ``repeats`` runs after one warm-up, the device synchronised each run."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@torch.inference_mode()
def run_device_search_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench search: --device {args.device} but torch.cuda.is_available() is False")
    B, b, k = args.batch, args.beam, args.branching
    report: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "timing": "wall time, device synchronised (median)",
        "setup": {"branching": k, "beam": b, "batch": B, "dim": args.dim, "memory_len": args.memory_len},
        "scaling": [],
    }
    for n in args.sizes:
        depth = levels_for(n, k)
        setup = make_setup(n, k, depth, B, args.dim, args.seed, memory_len=args.memory_len)
        decoder_model, table_model = setup.models
        assert isinstance(decoder_model, DecoderModel) and isinstance(table_model, TableModel)
        decoder = decoder_model.decoder.to(device).eval()
        memory = decoder_model.memory.to(device)  # [B, T, D]
        mask = decoder_model.memory_mask.to(device)  # [B, T]
        reference = FullPrefixScorer(decoder, memory, mask)
        table = TableScorer(table_model.logits.to(device), table_model.vocab_id.to(device))
        # a factory per search: the step's memory state is part of every search it times
        scorers: dict[str, Callable[[], Any]] = {
            "step": partial(StepScorer, decoder, memory, mask),
            "reference": partial(same, reference),
            "table": partial(same, table),
        }
        trie = DeviceTrie.from_index(setup.index, device)
        row: dict[str, Any] = {"items": n, "levels": depth, "nodes": setup.index.num_nodes}
        leaves: dict[str, list[list[int]]] = {}
        for key, make in scorers.items():
            search = partial(search_with, trie, make, B, b)
            secs, result = wall_timed(search, args.repeats, device)
            row[f"{key}_ms_per_batch"] = 1e3 * secs
            row[f"{key}_ms_per_level"] = 1e3 * secs / depth
            leaves[key] = result.leaves.cpu().tolist()
        row["step_reference_same_leaf_sets"] = sum(
            set(s) == set(r) for s, r in zip(leaves["step"], leaves["reference"], strict=True)
        )
        row["queries"] = B
        report["scaling"].append(row)
    return report


def cmd_search_device(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_device_search_bench(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = report["setup"]
    print(
        f"bench search on {report['device']} ({report['gpu'] or 'cpu'}): branching {s['branching']}, "
        f"beam {s['beam']}, batch {s['batch']}, D={s['dim']}; {report['timing']}"
    )
    print(
        f"{'items':>10}{'levels':>8}{'step ms/level':>15}{'reference ms/level':>20}{'table ms/level':>16}{'same':>8}"
    )
    for r in report["scaling"]:
        print(
            f"{r['items']:>10}{r['levels']:>8}{r['step_ms_per_level']:>15.2f}{r['reference_ms_per_level']:>20.2f}"
            f"{r['table_ms_per_level']:>16.2f}{r['step_reference_same_leaf_sets']:>5}/{r['queries']}"
        )
    return 0
