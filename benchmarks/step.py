"""The decoder step per level, for ``genret bench search``: FLOPs, the matrix-product limit, old vs new.

At every level of one real search (level tokens, the bench's tree), the CPU time of the scorer
calls is taken for

* ``new``: :meth:`models.nets.decoder.TokenDecoder.step`, the serving step (cached prefix keys/values,
  cross-attention batched per query over the memory state; what ``decoder.onnx`` holds), and once
  per search :meth:`TokenDecoder.memory_state` (the cross-attention keys/values of the memory;
  ``decoder_memory.onnx``), reported as its own row;
* ``old``: :meth:`TokenDecoder.forward`, the reference (the whole prefix at every level, the
  cross-attention keys/values gathered per beam); both searches must return the same leaves;
* ``limit``: single-thread ``torch.matmul`` on random matrices of the new step's GEMM shapes
  (:func:`step_gemms`), measured in the same run: what the step's products cost at this CPU's
  fp32 matrix-product speed, without anything else the step does;
* optionally ``decoder.onnx`` (the same step exported) under ONNX Runtime at each graph
  optimisation level and thread count.

FLOPs count a multiply-add as 2 (formulas in :data:`STEP_FORMULA` / :data:`REFERENCE_FORMULA`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.step_runs import (
    OrtStep,
    TimedScorer,
    TimedStepScorer,
    export_step,
    per_level_ms,
    run_ort,
    timed,
)
from models.nets.decoder import TokenDecoder
from models.search.beam import DeviceTrie
from models.search.staged import beam_search

MEMORY_FORMULA = "4*NL*B*T*D^2"
"""FLOPs of the memory state, once per search: every layer's cross keys and values of the memory."""
STEP_FORMULA = "NL*Bb*(12*D^2 + 4*S*D + 4*T*D + 4*D*F) + 2*Bb*D*V"
"""FLOPs of the new step at a level: per layer and beam q/k/v (6D^2), self-attention over S cached
positions, out (2D^2), cross q and out (4D^2), cross-attention over T keys, the feed-forward
(F = ff_mult*D); scores over the level's V tokens."""
REFERENCE_FORMULA = "4*NL*B*T*D^2 + NL*Bb*S*(12*D^2 + 4*S*D + 4*T*D + 4*D*F) + 2*Bb*C*D"
"""FLOPs of the reference at a level: the same per position, for all S prefix positions; scores
over the C gathered candidate rows."""


@dataclass(frozen=True)
class StepShape:
    """The sizes of one level's step: B queries x w beams (Bb = B*w), prefix length S."""

    level: int
    B: int
    w: int
    S: int
    T: int
    D: int
    layers: int
    heads: int
    F: int  # feed-forward width
    C: int  # candidates per beam
    V: int  # tokens per level (level scheme)

    @property
    def Bb(self) -> int:
        return self.B * self.w

    def flops(self) -> int:
        d, Bb = self.D, self.Bb
        per_beam = 12 * d * d + 4 * self.S * d + 4 * self.T * d + 4 * d * self.F
        return self.layers * Bb * per_beam + 2 * Bb * d * self.V

    def memory_flops(self) -> int:
        return 4 * self.layers * self.B * self.T * self.D * self.D

    def reference_flops(self) -> int:
        d, Bb, S = self.D, self.Bb, self.S
        per_pos = 12 * d * d + 4 * S * d + 4 * self.T * d + 4 * d * self.F
        return (
            4 * self.layers * self.B * self.T * d * d + self.layers * Bb * S * per_pos + 2 * Bb * self.C * d
        )


def level_shapes(decoder: TokenDecoder, B: int, beam: int, T: int, C: int, levels: int) -> list[StepShape]:
    cfg = decoder.config
    shapes, w = [], 1
    for level in range(1, levels + 1):
        shapes.append(
            StepShape(
                level,
                B,
                w,
                level,
                T,
                cfg.dim,
                cfg.num_layers,
                cfg.num_heads,
                cfg.ff_mult * cfg.dim,
                C,
                decoder.level_vocab,
            )
        )
        w = min(beam, w * C)
    return shapes


def step_gemms(s: StepShape) -> list[tuple[int, int, int, int, int]]:
    """``(count, batch, M, K, N)``: the matrix products of the new step at ``s`` (batch 1 = a plain GEMM)."""
    D, H, Bb = s.D, s.heads, s.Bb
    hd = D // H
    per_layer = [
        (1, 1, Bb, D, 3 * D),  # q, k, v of the new position
        (1, Bb * H, 1, hd, s.S),  # self-attention logits over S positions
        (1, Bb * H, 1, s.S, hd),  # ... weighted values
        (3, 1, Bb, D, D),  # self out, cross q, cross out
        (1, s.B * H, s.w, hd, s.T),  # cross-attention logits, one product per query and head
        (1, s.B * H, s.w, s.T, hd),  # ... weighted values
        (1, 1, Bb, D, s.F),  # feed-forward in
        (1, 1, Bb, s.F, D),  # feed-forward out
    ]
    scores = (1, 1, Bb, D, s.V)
    layered = [(n * s.layers, batch, M, K, N) for n, batch, M, K, N in per_layer]
    return [*layered, scores]


def memory_gemms(s: StepShape) -> list[tuple[int, int, int, int, int]]:
    """The memory state's products (once per search): cross keys | values of every layer, per query."""
    return [(s.layers, 1, s.B * s.T, s.D, 2 * s.D)]


def gemm_ms(batch: int, M: int, K: int, N: int, repeats: int) -> float:
    """Median CPU ms of ``torch.matmul`` on random ``[batch,] M x K`` and ``K x N`` (threads as set)."""
    a = torch.randn(batch, M, K) if batch > 1 else torch.randn(M, K)
    b = torch.randn(batch, K, N) if batch > 1 else torch.randn(K, N)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        torch.matmul(a, b)
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def limit_ms(gemms: list[tuple[int, int, int, int, int]], repeats: int) -> float:
    return sum(n * gemm_ms(batch, M, K, N, repeats) for n, batch, M, K, N in gemms)


def run_step_bench(model: Any, trie: DeviceTrie, args: Any) -> dict[str, Any]:
    """``model``: the bench's decoder over fixed states (``.decoder``, ``.memory``, ``.memory_mask``,
    ``.step`` the new step, ``.reference`` the old one)."""
    dec, memory, mask = model.decoder, model.memory, model.memory_mask
    B, T = memory.shape[:2]
    shapes = level_shapes(dec, B, args.beam, T, trie.max_branching, trie.levels)
    # rounds of (new, old, limit), so that a change of the host's load between them shows in all three
    rounds: list[tuple[list[float], list[float], list[float]]] = []
    memory_rounds: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        new_ms, _, new = per_level_ms(trie, lambda: TimedStepScorer(model), B, args.beam, 1)
        old_ms, _, old = per_level_ms(trie, lambda: TimedScorer(model.reference), B, args.beam, 1)
        rounds.append((new_ms, old_ms, [limit_ms(step_gemms(s), args.gemm_repeats) for s in shapes]))
        with torch.inference_mode():
            state_s, _ = timed(lambda: dec.memory_state(memory), 1)
        memory_rounds.append((1e3 * state_s, limit_ms(memory_gemms(shapes[0]), args.gemm_repeats)))
    levels = []
    for i, s in enumerate(shapes):
        new_l, old_l, limit = (statistics.median(r[j][i] for r in rounds) for j in range(3))
        levels.append(
            {
                "level": s.level,
                "queries": s.B,
                "beams_per_query": s.w,
                "prefix": s.S,
                "flops": s.flops(),
                "reference_flops": s.reference_flops(),
                "limit_ms": limit,
                "new_ms": new_l,
                "old_ms": old_l,
                "new_over_limit": statistics.median(r[0][i] / r[2][i] for r in rounds),
                "gemms": step_gemms(s),
            }
        )
    state_ms, state_limit = (statistics.median(r[j] for r in memory_rounds) for j in range(2))
    report: dict[str, Any] = {
        "memory_formula": MEMORY_FORMULA,
        "memory": {
            "flops": shapes[0].memory_flops(),
            "limit_ms": state_limit,
            "new_ms": state_ms,
            "new_over_limit": statistics.median(r[0] / r[1] for r in memory_rounds),
            "gemms": memory_gemms(shapes[0]),
        },
        "formula": STEP_FORMULA,
        "reference_formula": REFERENCE_FORMULA,
        "sizes": {"T": T, "D": dec.config.dim, "NL": dec.config.num_layers, "H": dec.config.num_heads},
        "levels": levels,
        "same_leaves": bool(torch.equal(new.leaves, old.leaves)),
        "ort": run_ort(dec, trie, memory, mask, args, new.leaves) if args.onnx else [],
    }
    if args.profile:
        report["profile"] = profile_step(model, trie, args)
    return report


def profile_step(
    model: Any, trie: DeviceTrie, args: Any, top: int = 12
) -> dict[str, list[tuple[str, float]]]:
    """Top ops (name, % of the step's self time) of one search: torch.profiler over the torch step,
    ORT's own profiler (``SessionOptions.enable_profiling``) over ``decoder.onnx`` (level ``all``)."""
    import json

    from models.bundle.backend import OnnxSession, session_options

    B = model.memory.shape[0]
    with torch.inference_mode(), torch.profiler.profile() as prof:
        beam_search(trie, model, B, args.beam, "logprob")
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    torch_top = sorted(((e.key, 100 * e.self_cpu_time_total / total) for e in events), key=lambda r: -r[1])
    by_op: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        state_path, path = export_step(model.decoder, model.memory, model.memory_mask, Path(tmp))
        opts = session_options(1, "all", profile_prefix=str(Path(tmp) / "ort"))
        session = OnnxSession(path, torch.device("cpu"), options=opts).session
        state_session = OnnxSession(
            state_path, torch.device("cpu"), options=session_options(1, "all")
        ).session
        with torch.inference_mode():
            beam_search(
                trie,
                OrtStep(state_session, session, model.memory, model.memory_mask, model.cache_width),
                B,
                args.beam,
                "logprob",
            )
        trace = json.loads(Path(session.end_profiling()).read_text())
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    ort_total = sum(by_op.values()) or 1.0
    ort_top = sorted(((op, 100 * us / ort_total) for op, us in by_op.items()), key=lambda r: -r[1])
    return {"torch": torch_top[:top], "onnxruntime": ort_top[:top]}


def print_step_report(r: dict[str, Any]) -> None:
    z = r["sizes"]
    print(
        f"decoder step per level (level tokens, T={z['T']}, D={z['D']}, {z['NL']} layers, {z['H']} heads; "
        f"CPU ms of the scorer calls, median; same leaves new vs old: {r['same_leaves']})"
    )
    print(f"  memory state FLOPs = {r['memory_formula']} (once per search)")
    print(f"  new step FLOPs = {r['formula']}")
    print(f"  old path FLOPs = {r['reference_formula']}")
    print("  limit = single-thread torch.matmul of the new step's GEMM shapes, this run")
    print(
        f"  {'level':>5}{'B x w':>10}{'S':>3}{'new MFLOP':>11}{'old MFLOP':>11}{'limit ms':>10}"
        f"{'new ms':>9}{'new/limit':>10}{'old ms':>9}{'old/new':>8}"
    )
    m = r["memory"]
    print(
        f"  {'state':>5}{'':>10}{'':>3}{m['flops'] / 1e6:>11.1f}{'':>11}{m['limit_ms']:>10.2f}"
        f"{m['new_ms']:>9.2f}{m['new_over_limit']:>9.2f}x"
    )
    for lv in r["levels"]:
        print(
            f"  {lv['level']:>5}{str(lv['queries']) + ' x ' + str(lv['beams_per_query']):>10}{lv['prefix']:>3}"
            f"{lv['flops'] / 1e6:>11.1f}{lv['reference_flops'] / 1e6:>11.1f}{lv['limit_ms']:>10.2f}"
            f"{lv['new_ms']:>9.2f}{lv['new_over_limit']:>9.2f}x{lv['old_ms']:>9.2f}{lv['old_ms'] / lv['new_ms']:>7.1f}x"
        )
    new_total = m["new_ms"] + sum(lv["new_ms"] for lv in r["levels"])
    limit_total = m["limit_ms"] + sum(lv["limit_ms"] for lv in r["levels"])
    old_total = sum(lv["old_ms"] for lv in r["levels"])
    print(
        f"  {'all':>5}{'':>10}{'':>3}{'':>11}{'':>11}{limit_total:>10.2f}{new_total:>9.2f}"
        f"{new_total / limit_total:>9.2f}x{old_total:>9.2f}{old_total / new_total:>7.1f}x"
    )
    if r["ort"]:
        print(
            "  decoder_memory.onnx, then decoder.onnx per level, under ONNX Runtime: CPU ms (wall ms),"
            " same leaves as the torch step:"
        )
        for row in r["ort"]:
            cells = f"state {row['prepare_ms']:.2f}  " + "  ".join(
                f"{c:.2f} ({w:.2f})" for c, w in zip(row["cpu_ms"], row["wall_ms"], strict=True)
            )
            print(
                f"  {row['optimization']:>9} x{row['threads']} threads: {cells}   same leaves: {row['same_leaves']}"
            )
            ort_total = row["prepare_ms"] + sum(row["cpu_ms"])
            ratios = "  ".join(
                f"{c / lv['limit_ms']:.2f}x" for c, lv in zip(row["cpu_ms"], r["levels"], strict=True)
            )
            print(
                f"  {'':>9}    / limit: state {row['prepare_ms'] / m['limit_ms']:.2f}x  {ratios}"
                f"   whole search {ort_total:.2f} ms, {ort_total / limit_total:.2f}x"
            )
    for engine, rows in r.get("profile", {}).items():
        print(f"  top ops, {engine} (% of self time over one search):")
        print("    " + "; ".join(f"{name} {pct:.1f}%" for name, pct in rows))
