"""``genret catalogue add | show`` (the live catalogue offline, docs/live_catalogue.md) and the wiring of
``genret bench catalogue`` / ``genret bench filters`` (the benchmarks live in ``benchmarks/``).

``catalogue add`` writes a delta as the next file of the bundle's delta directory, exactly as a
serving replica's ``POST /admin/items`` does: the same layout, sequence claim and rules, through
:mod:`service.catalogue.store` (``delta_dir``, ``DeltaStore.claim``; it imports no service stack).
The delta is first checked and applied (:meth:`models.catalogue.catalogue.Catalogue.apply`) on top of the
bundle and every delta file already there, applied as the service applies them (files of another
bundle fingerprint skipped, files that cannot be read or applied quarantined, with the service's
default limits), so a file it writes applies on every replica. ``catalogue show`` prints the version
those files make, the live items, and each file (a quarantined one with its reason).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def register(sub: Any, groups: dict[str, Any]) -> None:
    if "catalogue" not in sub.choices:
        cat = sub.add_parser("catalogue", help="add items to / remove items from a bundle's live catalogue")
        verbs = cat.add_subparsers(dest="catalogue_command", required=True)
        add = verbs.add_parser("add", help="check a delta and write it as the bundle's next delta file")
        add.add_argument("--bundle", type=Path, required=True, help="bundle directory")
        add.add_argument(
            "--delta", type=Path, required=True, help='JSON file {"add": [...], "remove": [...]}'
        )
        _catalogue_dir(add)
        add.set_defaults(func=cmd_add)
        show = verbs.add_parser("show", help="catalogue version, live items and delta files of a bundle")
        show.add_argument("--bundle", type=Path, required=True, help="bundle directory")
        _catalogue_dir(show)
        show.add_argument("--json", action="store_true", help="print JSON")
        show.set_defaults(func=cmd_show)
    if "bench" in groups and "filters" not in groups["bench"].choices:
        register_bench(groups["bench"])


def _catalogue_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--catalogue-dir",
        type=Path,
        default=None,
        help="GENRET_CATALOGUE_DIR of the service (default: the bundle's parent directory)",
    )


@dataclass
class Caught:
    """A bundle's catalogue with its delta files applied as the service applies them."""

    bundle: Any
    catalogue: Any
    store: Any
    seq: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)


def caught_up(bundle_path: Path, catalogue_dir: Path | None) -> Caught:
    from models.bundle.bundle import load_bundle
    from models.catalogue.catalogue import Catalogue
    from models.catalogue.delta import DeltaError
    from service.catalogue.store import DeltaStore, delta_dir

    bundle = load_bundle(bundle_path)
    fingerprint = bundle.manifest.fingerprint
    out = Caught(bundle, Catalogue.from_bundle(bundle), DeltaStore(delta_dir(bundle_path, catalogue_dir)))
    content = getattr(bundle, "content", None)
    for f in out.store.pending(0):
        out.seq = f.seq
        row: dict[str, Any] = {"file": f.path.name, "version": f.version}
        if f.delta is None:
            row["status"] = f"quarantined: {f.reason}: {f.error}"
        elif f.base_fingerprint != fingerprint:
            row["status"] = f"other bundle {f.base_fingerprint[:12]}"
        else:
            row.update(added=len(f.delta.add), removed=len(f.delta.remove))
            try:
                out.catalogue, _ = out.catalogue.apply(f.delta, content=content)
                row["status"] = f"applied as version {out.catalogue.version}"
            except DeltaError as exc:
                row["status"] = f"quarantined: refused: {exc}"
            except Exception as exc:  # as the service: a delta no replica can apply is passed over
                row["status"] = f"quarantined: apply_failed: {type(exc).__name__}: {exc}"
        out.files.append(row)
    return out


def cmd_add(args: argparse.Namespace) -> int:
    from models.catalogue.delta import Delta, DeltaError
    from service.catalogue.store import SequenceTaken

    try:
        delta = Delta.from_json(json.loads(args.delta.read_bytes().decode("utf-8")))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        print(f"genret catalogue add: cannot read {args.delta}: {type(exc).__name__}: {exc}")
        return 2
    except DeltaError as exc:
        print(f"genret catalogue add: {args.delta}: {exc}")
        return 2
    while True:
        state = caught_up(args.bundle, args.catalogue_dir)
        try:
            new, report = state.catalogue.apply(delta, content=getattr(state.bundle, "content", None))
        except DeltaError as exc:
            print(f"genret catalogue add: {args.delta}: {exc} (against version {state.catalogue.version})")
            return 2
        except Exception as exc:  # not published: no replica could apply it either
            print(
                f"genret catalogue add: {args.delta}: does not apply to version {state.catalogue.version}: {exc}"
            )
            return 2
        fingerprint = state.bundle.manifest.fingerprint
        published = delta.with_vectors(new.item_emb[list(report.dense_ids)])  # as POST /admin/items
        try:
            path = state.store.claim(state.seq + 1, fingerprint, new.version, published, report.placement)
        except SequenceTaken:
            continue  # another writer took the number: catch up and check again
        print(
            f"wrote {path}: version {report.version} (+{report.added} -{report.removed}; "
            f"{report.new_leaves} new leaves, {report.joined_copies} near copies), {new.num_live} live items"
        )
        return 0


def cmd_show(args: argparse.Namespace) -> int:
    state = caught_up(args.bundle, args.catalogue_dir)
    cat = state.catalogue
    info = {
        "bundle": str(args.bundle),
        "fingerprint": cat.fingerprint,
        "delta_dir": str(state.store.directory),
        "version": cat.version,
        "live_items": cat.num_live,
        "items": cat.num_items,
        "bundle_items": cat.base_items,
        "deltas": state.files,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle {args.bundle} ({cat.fingerprint[:12]}), deltas in {state.store.directory}")
    print(
        f"version {cat.version}: {cat.num_live} live items ({cat.num_items} dense ids, {cat.base_items} trained)"
    )
    for row in state.files:
        change = f"+{row['added']} -{row['removed']}" if "added" in row else ""
        print(f"  {row['file']}  {change:>16}  {row['status']}")
    return 0


# ---------------------------------------------------------------- genret bench catalogue | filters


def register_bench(group: Any) -> None:
    b = group.add_parser(
        "catalogue",
        help="p99 at concurrency 32 without and during POST /admin/items of N new items",
        description="Serve a synthetic bundle (uvicorn subprocesses sharing one delta directory), drive "
        "the last replica closed loop at a fixed concurrency, measure p99 without an add, then while "
        "10,000 items (vectors given) are added through POST /admin/items on the first: time until "
        "the add is live on each replica, failed requests, p99 during vs without.",
    )
    b.add_argument("--items", type=int, default=1_000_000, help="catalogue size N")
    b.add_argument("--add", type=int, default=10_000, help="items added by the one POST /admin/items")
    b.add_argument("--levels", type=int, default=3)
    b.add_argument("--dim", type=int, default=64)
    b.add_argument("--concurrency", type=int, default=32)
    b.add_argument("--baseline-s", type=float, default=10.0, help="seconds of load measured without an add")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--beam-size", type=int, default=20)
    b.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads of the served app")
    b.add_argument("--workdir", type=Path, default=Path("runs/bench_catalogue"))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--poll-s",
        type=float,
        default=None,
        help="GENRET_CATALOGUE_POLL_S of the served app (default: its own)",
    )
    b.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="service processes sharing the delta directory: the first takes the add, the last the load",
    )
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_catalogue)

    f = group.add_parser(
        "filters",
        help="allow-lists of 1%% of the catalogue: dense-fill share and overlap@K with exact top-K",
        description="In process: the Retriever at the bundle's default beam with per-request allow-lists "
        "(random, subtree-clustered, nearest-in-item-space) and the dense fill, against exact top-K over "
        "the allowed items, beside no filter.",
    )
    f.add_argument("--bundle", type=Path, default=None, help="a bundle (default: a synthetic one of --items)")
    f.add_argument("--items", type=int, default=100_000)
    f.add_argument("--share", type=float, default=0.01, help="share of the catalogue in an allow-list")
    f.add_argument("--k", type=int, default=20)
    f.add_argument("--requests", type=int, default=200)
    f.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    f.add_argument("--workdir", type=Path, default=Path("runs/bench_filters"))
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_bench_filters)


def cmd_bench_filters(args: argparse.Namespace) -> int:
    from benchmarks.filters import FilterConfig, run_filters

    cfg = FilterConfig(
        bundle=args.bundle, items=args.items, share=args.share, k=args.k, requests=args.requests,
        backend=args.backend, workdir=args.workdir, seed=args.seed,
    )  # fmt: skip
    return run_filters(cfg, as_json=args.json)


def cmd_bench_catalogue(args: argparse.Namespace) -> int:
    from benchmarks.catalogue import CatalogueBenchConfig, run_catalogue_bench

    cfg = CatalogueBenchConfig(
        items=args.items, add=args.add, levels=args.levels, dim=args.dim, concurrency=args.concurrency,
        baseline_s=args.baseline_s, k=args.k, beam_size=args.beam_size, threads=args.threads,
        workdir=args.workdir, seed=args.seed, poll_s=args.poll_s, replicas=args.replicas,
    )  # fmt: skip
    started = time.monotonic()
    code = run_catalogue_bench(cfg, as_json=args.json)
    print(f"(bench catalogue took {time.monotonic() - started:.0f} s)")
    return code
