"""``genret bench search``, ``bench cluster`` and ``bench retrieve``: the wiring (flags and their
parsers); the benchmarks live in :mod:`benchmarks.search`, :mod:`benchmarks.cluster` and
:mod:`benchmarks.retrieve`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cluster import cmd_cluster
from benchmarks.retrieve import cmd_retrieve
from benchmarks.search import cmd_search
from benchmarks.search_device import cmd_search_device
from models.bundle.backend import GRAPH_OPTIMIZATION


def register(sub: Any, groups: dict[str, Any]) -> None:
    register_search(groups["bench"])
    register_retrieve(groups["bench"])


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1000000:3,10000000:4"`` -> ``[(1000000, 3), (10000000, 4)]`` (items, levels)."""
    out = []
    for part in filter(None, text.split(",")):
        try:
            items, levels = (int(float(x)) for x in part.split(":"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--sizes wants items:levels pairs, got {part!r}") from exc
        if items < 2 or levels < 1:
            raise argparse.ArgumentTypeError(f"--sizes: need items >= 2 and levels >= 1, got {part!r}")
        out.append((items, levels))
    if not out:
        raise argparse.ArgumentTypeError("--sizes is empty")
    return out


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return values


def parse_grid(text: str) -> list[tuple[int, float]]:
    """``"16:1,64:2"`` -> ``[(16, 1.0), (64, 2.0)]`` (max batch, max wait ms)."""
    pairs = []
    for part in filter(None, text.split(",")):
        batch, _, wait = part.partition(":")
        if not batch.isdigit() or int(batch) < 1 or not wait:
            raise argparse.ArgumentTypeError(f"want max_batch:max_wait_ms, got {part!r}")
        pairs.append((int(batch), float(wait)))
    return pairs


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(part)) for part in text.split(",") if part]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers, got {text!r}")
    return sizes


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        parts = [part for part in text.split(",") if part]
        if not parts or any(part not in allowed for part in parts):
            raise argparse.ArgumentTypeError(
                f"want a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return parts

    return parse


def _schemes(text: str) -> list[str]:
    schemes = [part for part in text.split(",") if part]
    if not schemes or any(part not in ("level", "node") for part in schemes):
        raise argparse.ArgumentTypeError(
            f"--schemes wants a comma-separated subset of level,node, got {text!r}"
        )
    return schemes


def register_search(group: Any) -> None:
    search = group.add_parser(
        "search",
        help="batched constrained beam search vs GENRE/HF-style per-query search, and cost vs catalogue size",
    )
    search.add_argument("--batch", type=int, default=64)
    search.add_argument("--beam", type=int, default=20)
    search.add_argument("--branching", type=int, default=64)
    search.add_argument(
        "--levels", type=int, default=3, help="depth of the comparison tree (branching**levels items)"
    )
    search.add_argument("--dim", type=int, default=64, help="decoder width")
    search.add_argument("--memory-len", type=int, default=50, help="T: encoder states per query")
    search.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time decoder.onnx (the exported step) under ONNX Runtime",
    )
    search.add_argument(
        "--ort-optimizations",
        type=_choices(tuple(GRAPH_OPTIMIZATION)),
        default=["basic", "all"],
        help=f"ORT graph optimisation levels to time, a comma-separated subset of {','.join(GRAPH_OPTIMIZATION)}",
    )
    search.add_argument(
        "--ort-threads",
        type=_sizes,
        default=[1, 2],
        help="ORT intra-op thread counts to time (comma-separated)",
    )
    search.add_argument("--gemm-repeats", type=int, default=15, help="runs of each GEMM shape for the limit")
    search.add_argument(
        "--profile", action="store_true", help="print the step's top ops (torch.profiler and ORT's profiler)"
    )
    search.add_argument("--sizes", type=_sizes, default=[10_000, 100_000, 1_000_000], help="catalogue sizes")
    search.add_argument("--repeats", type=int, default=3)
    search.add_argument(
        "--schemes", type=_schemes, default=["level", "node"], help="token schemes to compare (level,node)"
    )
    search.add_argument(
        "--node-baseline-queries",
        type=int,
        default=4,
        help="queries the baseline runs with node tokens (slow)",
    )
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    search.add_argument(
        "--device",
        help="cpu | cuda[:i]: step vs full-prefix vs table search cost against --sizes in synchronised "
        "wall time on that device (no GENRE baseline, no profiles); omitted: the CPU bench above",
    )
    search.add_argument("--json", action="store_true", help="print the report as JSON")
    search.set_defaults(func=run_search)

    cluster = group.add_parser(
        "cluster", help="balanced hierarchical k-means (SEATER Alg. 1) vs plain k-means, time and balance"
    )
    cluster.add_argument("--items", type=int, default=1_000_000)
    cluster.add_argument("--dim", type=int, default=64)
    cluster.add_argument("--k", type=int, default=64)
    cluster.add_argument("--iters", type=int, default=8, help="k-means iterations per level (both methods)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    cluster.add_argument("--json", action="store_true", help="print the report as JSON")
    cluster.set_defaults(func=cmd_cluster)


def register_retrieve(group: Any) -> None:
    p = group.add_parser(
        "retrieve",
        help="in-process Retriever speed on a device: max throughput and open-loop latency (no HTTP)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("1000000:3,10000000:4"), help="items:levels,..."
    )
    p.add_argument("--dim", type=int, default=64, help="model width D")
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--history", type=int, default=20, help="history length of every request")
    p.add_argument(
        "--batches", type=parse_ints, default=[1, 16, 64, 256, 1024], help="max-throughput batch sizes"
    )
    p.add_argument("--throughput-seconds", type=float, default=2.0, help="time per batch size")
    p.add_argument("--rate", type=float, default=2000.0, help="open-loop offered requests/s")
    p.add_argument("--duration", type=float, default=5.0, help="open-loop seconds of arrivals")
    p.add_argument("--max-batch", type=int, default=64, help="open-loop batcher: max batch size")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="open-loop batcher: max wait of the oldest")
    p.add_argument(
        "--open-loop-grid",
        type=parse_grid,
        default=[],
        help="extra open-loop runs, max_batch:max_wait_ms,... (e.g. 16:1,64:1,256:2)",
    )
    p.add_argument(
        "--cuda-graphs", action="store_true", help="serve retrieve through CUDA graphs (torch on cuda)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_retrieve"), help="bundle cache")
    p.add_argument("--json-out", type=Path, help="rewrite the JSON report here after every phase")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_retrieve)


def run_search(args: argparse.Namespace) -> int:
    """Wall time on a device (``--device``, the GPU check) or the CPU report."""
    return cmd_search_device(args) if args.device is not None else cmd_search(args)
