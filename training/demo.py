"""`python -m training.demo` (`make demo`): popularity vs SASRec on the default data, briefly.

Runs the same code path as ``genret compare --data default --methods popular,sasrec --max-epochs 10``
and prints its table. A trained SASRec is cached under runs/cache, so a second run is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.commands.compare import format_table, make_context, run_compare

DEMO_METHODS: tuple[str, ...] = ("popular", "sasrec")
DEMO_MAX_EPOCHS = 10


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = argparse.Namespace(
        data="default",
        fmt=None,
        skip_bad_lines=False,
        split="user",
        seed=0,
        max_len=50,
        max_epochs=DEMO_MAX_EPOCHS,
        workdir=Path("runs") / "demo",
        overrides=None,
    )
    ctx = make_context(args, "demo")
    results = run_compare(ctx, list(DEMO_METHODS))
    print()
    print(format_table(ctx.dataset, ctx.split, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
