"""Profile one POST /admin/items in process: the registry, ``LiveCatalogue.add`` (parse, check, the
delta file written and read back, apply, swap) for ``--add`` new items on a bundle.

    python scripts/prof_catalogue_add.py runs/bench_catalogue/bundle-n1000000-l3-b100-d64-s0 [--add 10000] [--reader]

Prints the load, the background build (version 0) and the add's wall time, then the add's profile.
``--reader``: a second replica (its own registry on the same delta directory) then takes the
published delta (``LiveCatalogue.sync``, the writer's placement carried in it): its wall time and
profile instead.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np

from service.catalogue.live import LiveCatalogue
from service.registry.model_registry import ModelRegistry
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--add", type=int, default=10_000)
    parser.add_argument("--reader", action="store_true", help="profile a second replica taking the delta")
    args = parser.parse_args()
    settings = Settings(
        bundle_path=Path(args.bundle), catalogue_dir=Path(tempfile.mkdtemp()), env="test", catalogue_poll_s=0
    )
    registry = ModelRegistry(settings)
    t = time.perf_counter()
    registry.load_all()
    print(f"load {time.perf_counter() - t:.2f} s")
    catalogue = LiveCatalogue(settings, registry)
    t = time.perf_counter()
    catalogue.prebuild(registry.get(None))
    print(f"version 0 (built at load) {time.perf_counter() - t:.2f} s")
    model = registry.get(None)
    rng = np.random.default_rng(0)
    emb = model.item_emb[1 : args.add + 1].cpu().numpy()
    vectors = emb + 0.03 * rng.standard_normal(emb.shape).astype(np.float32)
    body = json.dumps({"add": [{"id": f"new-{i}", "vector": v.tolist()} for i, v in enumerate(vectors)]})
    reader: tuple[ModelRegistry, LiveCatalogue] | None = None
    if args.reader:
        other = ModelRegistry(settings)
        reader = other, LiveCatalogue(settings, other)
        other.load_all()
    profile = cProfile.Profile()
    t = time.perf_counter()
    if reader is None:
        profile.enable()
    out = catalogue.add(None, json.loads(body))
    profile.disable()
    print(f"add {time.perf_counter() - t:.2f} s: {out}")
    if reader is not None:
        t = time.perf_counter()
        profile.enable()
        _, reports = reader[1].sync(reader[0].get(None).name)
        profile.disable()
        carried = [r.carried for r in reports.values()]
        print(f"reader takes it {time.perf_counter() - t:.2f} s (placement carried: {carried})")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
