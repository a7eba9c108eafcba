"""``genret bench catalogue``: adding items to a serving bundle under load.

One run: a synthetic bundle of ``--items`` is served by ``--replicas`` real uvicorn processes
(``python -m service``, :class:`benchmarks.launcher.ServiceProcess`) sharing one delta directory.
``--concurrency`` closed-loop connections (each sends its next ``POST /v1/retrieve`` when the
previous answer arrived: pre-encoded keep-alive requests, :class:`benchmarks.load.Connection`) load
the *serving* replica (the last one) for the whole measurement, every request recorded with its
start, end and status. After a warm-up and ``--baseline-s`` seconds of load (*without*), one
``POST /admin/items`` to the *writer* (the first replica; with one replica, the same process) adds
``--add`` items with vectors; it answers 200 once live there, or 202 with a job for a delta over
``GENRET_CATALOGUE_ASYNC_ITEMS``. Each replica's ``/v1/models`` is then polled until it serves the
new version: the add is *live* on a replica at that moment (*during*: the serving replica's requests
overlapping the time from the POST to the add being live there); the load goes on a few seconds
more (*after*). Goals: live on every replica within 20 s, no request fails, p99 during within 1.2x
of p99 without, on the replica that serves (it installs the writer's placement, docs/live_catalogue.md).

The deltas go to a fresh ``GENRET_CATALOGUE_DIR`` per run (removed afterwards), so the bundle is
reusable across runs. The new items' vectors are perturbed copies of random existing items.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.launcher import ONE_CLIENT_LOAD, ServiceProcess
from benchmarks.load import Connection, retrieve_bodies, run_loop
from models.catalogue.delta import Delta, NewItem

ADMIN_TOKEN = "bench-catalogue-admin-token"
WARMUP_S = 2.0
AFTER_S = 3.0
REQUEST_TIMEOUT_S = 30.0
LIVE_TIMEOUT_S = 600.0  # the most a replica is waited for to serve the add


@dataclass(frozen=True)
class CatalogueBenchConfig:
    items: int = 1_000_000
    add: int = 10_000
    levels: int = 3
    dim: int = 64
    concurrency: int = 32
    baseline_s: float = 10.0
    k: int = 10
    beam_size: int = 20
    threads: int = 1
    workdir: Path = Path("runs/bench_catalogue")
    seed: int = 0
    poll_s: float | None = None  # GENRET_CATALOGUE_POLL_S of the served app (None: its default)
    replicas: int = 2  # the first takes the add, the last serves the load

    @property
    def branching(self) -> int:
        return max(2, math.ceil(self.items ** (1.0 / self.levels) - 1e-9))


@dataclass(frozen=True)
class Phase:
    requests: int
    failed: int  # non-2xx, socket errors, timeouts
    qps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class CatalogueResult:
    items: int
    added: int
    concurrency: int
    add_wall_s: float  # POST /admin/items sent -> answered (200: live on the writer; 202: accepted)
    add_status: int
    live_s: list[float]  # POST sent -> the new version served, per replica (writer first; goal < 20)
    server_apply_s: float  # genret_catalogue_apply_seconds after the add
    version: int  # catalogue version the add made, once live everywhere (-1: not live)
    without: Phase
    during: Phase
    after: Phase
    p99_ratio: float  # during / without (goal <= 1.2)
    answer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    start: float
    end: float
    ok: bool


def bundle_path(cfg: CatalogueBenchConfig) -> Path:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = cfg.workdir / f"bundle-n{cfg.items}-l{cfg.levels}-b{cfg.branching}-d{cfg.dim}-s{cfg.seed}"
    if (out / "manifest.json").is_file():
        print(f"reusing bundle {out}", flush=True)
        return out
    print(
        f"building synthetic bundle: {cfg.items} items, {cfg.levels} levels of {cfg.branching} ...",
        flush=True,
    )
    return make_synthetic_bundle(out, cfg.items, cfg.branching, cfg.levels, dim=cfg.dim, seed=cfg.seed)


def add_body(bundle: Path, count: int, seed: int) -> bytes:
    """``{"add": [...]}`` of ``count`` new items: perturbed copies of random existing items' vectors,
    sent as a client adding many items would (``vector_f32``: base64 float32, a quarter of the JSON)."""
    with np.load(bundle / "items.npz", allow_pickle=False) as data:
        emb = data["item_emb"]
    rng = np.random.default_rng(seed + 1)
    base = emb[rng.integers(1, len(emb), count)]
    vectors = base + 0.3 * float(emb[1:].std()) * rng.standard_normal(base.shape).astype(np.float32)
    delta = Delta(add=tuple(NewItem(f"new-{seed}-{i}", v.astype(np.float32)) for i, v in enumerate(vectors)))
    return json.dumps(delta.to_json(compact=True)).encode()  # vectors as base64 float32 (vector_f32)


def service_env(cfg: CatalogueBenchConfig, bundle: Path, deltas: Path) -> dict[str, str]:
    return {
        "GENRET_BUNDLE_PATH": str(bundle),
        "GENRET_CATALOGUE_DIR": str(deltas),
        "GENRET_ADMIN_TOKEN": ADMIN_TOKEN,
        "GENRET_LOCAL_CACHE_ENTRIES": "0",  # every request computes
        "GENRET_QUEUE_SIZE": "4096",
        "GENRET_DEFAULT_DEADLINE_MS": "10000",
        "GENRET_MAX_BEAM_SIZE": str(max(256, cfg.beam_size)),
        "GENRET_DEFAULT_BEAM_SIZE": str(cfg.beam_size),
        "GENRET_MAX_HISTORY_ITEMS": "100",
        **ONE_CLIENT_LOAD,
        "GENRET_MAX_ADMIN_BODY_BYTES": str(max(64 * 1_048_576, 1024 * cfg.add)),  # ~620 bytes per item
        "GENRET_QUALITY_SAMPLE": "0",
        "GENRET_TORCH_THREADS": str(cfg.threads),
        "GENRET_INTRA_OP_THREADS": str(cfg.threads),
        "OMP_NUM_THREADS": str(cfg.threads),
        **({} if cfg.poll_s is None else {"GENRET_CATALOGUE_POLL_S": str(cfg.poll_s)}),
    }


async def _worker(
    port: int, bodies: list[bytes], offset: int, stop: asyncio.Event, out: list[Record]
) -> None:
    conn: Connection | None = None
    i = offset
    while not stop.is_set():
        start = time.perf_counter()
        ok = False
        try:
            if conn is None:
                conn = await Connection.open("127.0.0.1", port)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, keep = await conn.exchange(bodies[i % len(bodies)])
            ok = 200 <= status < 300
            if not keep:
                conn.close()
                conn = None
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            if conn is not None:
                conn.close()
            conn = None
        out.append(Record(start, time.perf_counter(), ok))
        i += 1
    if conn is not None:
        conn.close()


async def _live_at(
    client: httpx.AsyncClient, service: ServiceProcess, version: int, deadline: float
) -> float:
    """When ``service`` first serves catalogue ``version`` (polled every 50 ms), perf_counter time."""
    while time.perf_counter() < deadline:
        models = (await client.get(f"{service.url}/v1/models")).json()["models"]
        if models and models[0]["catalogue_version"] >= version:
            return time.perf_counter()
        await asyncio.sleep(0.05)
    return math.nan


async def _drive(
    services: list[ServiceProcess], bodies: list[bytes], body: bytes, cfg: CatalogueBenchConfig
) -> tuple[list[Record], float, float, list[float], httpx.Response]:
    """Load on the last replica throughout; the add to the first after warm-up + baseline.
    -> (records, add sent, add answered, live on each replica, answer)."""
    stop = asyncio.Event()
    records: list[Record] = []
    step = max(1, len(bodies) // cfg.concurrency)
    workers = [
        asyncio.create_task(_worker(services[-1].port, bodies, c * step, stop, records))
        for c in range(cfg.concurrency)
    ]
    await asyncio.sleep(WARMUP_S + cfg.baseline_s)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=600.0) as admin:
        t0 = time.perf_counter()
        answer = await admin.post(f"{services[0].admin_url}/admin/items", content=body, headers=headers)
        t1 = time.perf_counter()
        watch = [_live_at(admin, s, 1, t0 + LIVE_TIMEOUT_S) for s in services]  # a fresh log: version 1
        live = list(await asyncio.gather(*watch)) if answer.status_code in (200, 202) else [math.nan]
    await asyncio.sleep(AFTER_S)
    stop.set()
    await asyncio.gather(*workers)
    return records, t0, t1, live, answer


def wait_prebuilt(url: str, timeout_s: float = 600.0) -> None:
    """Wait until the service reports its catalogue built (``genret_catalogue_prebuilt`` 1)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
        if any(
            line.startswith("genret_catalogue_prebuilt{") and line.endswith(" 1.0")
            for line in text.splitlines()
        ):
            return
        time.sleep(0.5)
    raise RuntimeError("the service did not report its catalogue built (genret_catalogue_prebuilt)")


def phase(records: list[Record], lo: float, hi: float, *, overlap: bool) -> Phase:
    """Requests inside ``[lo, hi]`` (``overlap``: any overlapping it)."""
    if overlap:
        chosen = [r for r in records if r.start <= hi and r.end >= lo]
    else:
        chosen = [r for r in records if r.start >= lo and r.end <= hi]
    lat = np.array([1000.0 * (r.end - r.start) for r in chosen if r.ok])
    span = max(hi - lo, 1e-9)
    return Phase(
        requests=len(chosen),
        failed=sum(not r.ok for r in chosen),
        qps=float(sum(r.ok for r in chosen) / span),
        p50_ms=float(np.percentile(lat, 50)) if len(lat) else math.nan,
        p99_ms=float(np.percentile(lat, 99)) if len(lat) else math.nan,
    )


def apply_seconds(url: str) -> float:
    from benchmarks.shadow import metric_samples

    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    values = [v for name, _, v in metric_samples(text) if name == "genret_catalogue_apply_seconds"]
    return max(values) if values else math.nan


def format_table(r: CatalogueResult) -> str:
    def row(name: str, p: Phase) -> str:
        return f"| {name} | {p.requests} | {p.failed} | {p.qps:.0f} | {p.p50_ms:.1f} | {p.p99_ms:.1f} |"

    return "\n".join(
        [
            f"catalogue {r.items} items, +{r.added} items by one POST /admin/items, concurrency {r.concurrency} "
            f"on the last of {len(r.live_s)} replicas",
            f"add: answered {r.add_status} in {r.add_wall_s:.2f} s; live on each replica after "
            + ", ".join(f"{s:.2f}" for s in r.live_s)
            + f" s (goal < 20 s); serving replica's apply {r.server_apply_s:.2f} s; failed during: "
            f"{r.during.failed} (goal 0); p99 during / without: {r.p99_ratio:.2f}x (goal <= 1.2x)",
            "",
            "| phase | requests | failed | QPS | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            row("without add", r.without),
            row("during add", r.during),
            row(f"after add ({AFTER_S:.0f} s)", r.after),
        ]
    )


def run_catalogue_bench(cfg: CatalogueBenchConfig, as_json: bool = False) -> int:
    bundle = bundle_path(cfg)
    deltas = cfg.workdir / f"deltas-{int(time.time())}"
    bodies = retrieve_bodies(
        bundle, 4096, k=cfg.k, beam_size=cfg.beam_size, seed=cfg.seed, user_prefix="u", users=4096
    )
    body = add_body(bundle, cfg.add, cfg.seed)
    poll = "service default" if cfg.poll_s is None else f"{cfg.poll_s:g}"
    print(
        f"add body: {len(body) / 2**20:.1f} MiB for {cfg.add} items; GENRET_CATALOGUE_POLL_S: {poll}",
        flush=True,
    )
    env = service_env(cfg, bundle, deltas)
    services = [ServiceProcess(env, cfg.workdir / f"service-{i}.log") for i in range(max(1, cfg.replicas))]
    try:
        for service in services:  # one at a time: each builds its catalogue before it is ready
            service.start(ready_timeout_s=600)
            wait_prebuilt(service.url)  # the baseline must not overlap a catalogue build
        records, t0, t1, live, answer = run_loop(_drive(services, bodies, body, cfg))
        server_s = apply_seconds(services[-1].url)
    finally:
        for service in services:
            service.stop()
        shutil.rmtree(deltas, ignore_errors=True)
    begin = min(r.start for r in records) + WARMUP_S
    payload = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
    live_here = live[-1] if not math.isnan(live[-1]) else t1
    without = phase(records, begin, t0, overlap=False)
    during = phase(records, t0, max(t1, live_here), overlap=True)
    result = CatalogueResult(
        items=cfg.items,
        added=cfg.add,
        concurrency=cfg.concurrency,
        add_wall_s=t1 - t0,
        add_status=answer.status_code,
        live_s=[t - t0 for t in live],
        server_apply_s=server_s,
        version=1 if not any(math.isnan(t) for t in live) else -1,  # a fresh log: the add makes version 1
        without=without,
        during=during,
        after=phase(records, max(t1, live_here), max(r.end for r in records), overlap=False),
        p99_ratio=during.p99_ms / without.p99_ms if without.p99_ms > 0 else math.nan,
        answer=payload if isinstance(payload, dict) else {},
    )
    print(format_table(result))
    if as_json:
        print(json.dumps(asdict(result), indent=2))
    return 0 if answer.status_code in (200, 202) and not any(math.isnan(t) for t in live) else 1
