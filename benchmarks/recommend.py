"""/recommend at the speed of its compute: the fused cascade, approximate matching, every hop measured.

    python benchmarks/recommend.py                 # ~20 minutes on 2 cores (HNSW's build alone ~4)
    python benchmarks/recommend.py --part local    # (a) and (b) only, no HTTP
    python benchmarks/recommend.py --no-hnsw       # skip HNSW in (b)

(a) The in-process limit: the cascade for one request at a time (20 000 items exact; 1 000 000 items with
    the IVF index and exact).
(b) Matching's index at 1 000 000 items: build time, recall@500 against exact search, ms per query, for
    exact search, faiss IVF-Flat at several probe counts (the calibrated default marked) and faiss HNSW.
(c) POST /recommend and /feedback under fixed offered load, side by side in one run: the fused path, the
    composed path (a deployment per stage, handles between them) and the same fused handler in plain uvicorn
    without Ray (20 000 items); fused at 1 000 000 items (IVF); fused with the utility agent (explore mode)
    beside fused without it at 200 req/s; /feedback at 500 req/s. Open loop from benchmarks/loadgen with 64
    connections, on the same 2 cores as the servers: the config file's setup (HAProxy + Serve's throughput mode,
    2 fused replicas, micro-batching ≤ 8), the same without micro-batching, one replica, and HAProxy without
    throughput mode beside it.
(d) Where the time goes: the replicas' server-timing metrics from the same runs (each stage's compute, each
    handle hop on the composed path, the wait for the agent) and the proxy + network (service − app).
Writes benchmarks/results/recommend.md and recommend.png (latency against offered load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import Pipeline  # noqa: E402
from actors.matching_index import MatchingIndex, recall_at_k  # noqa: E402
from actors.stages import (  # noqa: E402
    DEFAULT_PARAMS,
    RequestBatch,
    StageContext,
    gumbel,
    top_k,
    tower_t64,
    user_query,
)
from actors.world import PipelineConfig, World, WorldConfig  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_load_args,
    drive_rates,
    http_table,
    machine,
    run_server_configs,
    stop_server,
    wait_for,
    write_results,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "recommend.md")
RUNS = os.path.join(ROOT, "benchmarks", "results", "recommend_runs.json")
PLOT = os.path.join(ROOT, "benchmarks", "results", "recommend.png")
CONFIG = os.path.join(ROOT, "serve_apps", "configs", "recommend.yaml")
BIG = 1_000_000
# server configuration → (route label, offered rates, overrides of serve_apps/configs/recommend.yaml)
SERVERS = {
    # the fused app is offered 1 000 too: an achieved rate counts the last responses' drain, so 800 offered shows ~799
    "fused": ("recommend fused (2 replicas, micro-batched)", [200, 400, 500, 800, 1000], {}),
    "fused-unbatched": ("recommend fused (2 replicas), no micro-batching", [200, 400, 500, 800], {"micro_batch": 1}),
    "fused-1": ("recommend fused, 1 replica", [200, 400, 500], {"num_replicas": 1}),
    "fused-haproxy": ("recommend fused (2 replicas), HAProxy alone", [200, 400, 500, 800], {"ingress": "haproxy"}),
    "composed": ("recommend composed", [100, 200, 500], {"cascade": "composed", "num_replicas": 1, "micro_batch": 1}),
    "uvicorn": ("recommend fused, plain uvicorn (no Ray, 1 process)", [200, 500, 800, 1000], None),
    "uvicorn-2": ("recommend fused, plain uvicorn (no Ray, 2 processes)", [200, 500, 800, 1000], None),
    "fused-1m": ("recommend fused (2 replicas), 1 000 000 items (IVF)", [100, 200, 400], {"n_items": BIG}),
    "fused-agent": ("recommend fused (2 replicas) + utility agent", [200], {"utility_agent": {"mode": "explore"}}),
    "feedback": ("feedback (fused app, 2 replicas)", [500, 1000], {}),
}


def median_ms(fn, n: int) -> float:
    fn(0)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def one_request(world: World, i: int) -> RequestBatch:
    rng = np.random.default_rng(i)
    history = np.full((1, 20), -1, np.int64)
    history[0, -5:] = rng.integers(0, world.catalogue.n, 5)
    return RequestBatch(rng.integers(0, world.users.n, 1), history, np.ones(1, np.int32), request_id=i + 1)


def local_part(hnsw: bool) -> tuple[str, str]:
    """(a) the cascade in process, one request at a time; (b) matching's index at 1 000 000 items."""
    rows = []
    small = World(WorldConfig(n_items=20_000))
    pipe = Pipeline(small)
    rows.append(("20 000", "exact", median_ms(lambda i: pipe.recommend(one_request(small, i)), 300)))
    print(f"  (a) 20 000 items exact: {rows[-1][2]:.2f} ms/request", flush=True)
    big = World(WorldConfig(n_items=BIG))
    for kind in ("ivf", "exact"):
        pipe = Pipeline(big, PipelineConfig(matching_index=kind))
        rows.append(("1 000 000", kind, median_ms(lambda i, p=pipe: p.recommend(one_request(big, i)), 100)))
        print(f"  (a) 1 000 000 items {kind}: {rows[-1][2]:.2f} ms/request", flush=True)
    cascade = [
        "| catalogue items | matching | ms per request (median) | requests/s on one core |",
        "|---:|---|---:|---:|",
    ]
    cascade += [f"| {n} | {kind} | {ms:.2f} | {1e3 / ms:,.0f} |" for n, kind, ms in rows]
    ctx = StageContext(small, 0)
    q = user_query(ctx, one_request(small, 0), np.full(1, 0.5, np.float32))  # float64, as matching's query is
    converted = median_ms(lambda i: q @ ctx.item_tower.T, 300)
    once = median_ms(lambda i: q @ tower_t64(ctx), 300)
    gen = np.random.default_rng(0)
    f64 = median_ms(lambda i: gen.gumbel(size=(1, 20_000)).astype(np.float32), 300)
    vec = median_ms(lambda i: gumbel(gen, (1, 20_000)), 300)
    scores = gumbel(gen, (1, 20_000))
    full = median_ms(lambda i: np.argpartition(-scores, 499, axis=1)[:, :500], 300)
    pre = median_ms(lambda i: top_k(scores, 500, ordered=False), 300)
    cascade += [
        "",
        "Matching's three per-item costs for one request at 20 000 items, the old way and the new side by side: its "
        f"scores ⟨q, item⟩ (a float64 query) against the float32 tower, which NumPy converts on every request, "
        f"{converted:.3f} ms, against `actors.stages.tower_t64` (the same float64 copy, made once; the same scores) "
        f"{once:.3f} ms, {converted / once:.1f}× faster; its exploration noise, one Gumbel draw per item, "
        f"`Generator.gumbel` (cast to float32) {f64:.3f} ms against "
        f"`actors.stages.gumbel` (the same values from the same stream, NumPy's vectorised log; what matching draws) "
        f"{vec:.3f} ms, {f64 / vec:.1f}× faster; its top 500, `argpartition` over every score {full:.3f} ms against "
        f"`actors.stages.top_k` (a threshold from every 16th score first) {pre:.3f} ms, {full / pre:.1f}× faster.",
    ]
    print(f"  (a) scores: converted tower {converted:.3f} ms, tower_t64 {once:.3f} ms", flush=True)
    print(f"  (a) Gumbel noise: Generator.gumbel {f64:.3f} ms, gumbel {vec:.3f} ms", flush=True)
    print(f"  (a) top 500 of 20 000: argpartition {full:.3f} ms, top_k {pre:.3f} ms", flush=True)

    ctx = StageContext(big, 0)
    q = np.concatenate([user_query(ctx, one_request(big, 10_000 + i), np.full(1, 0.5, np.float32)) for i in range(200)])
    w_rel, w_pop = np.ones(len(q), np.float32), np.full(len(q), DEFAULT_PARAMS["matching"][1], np.float32)
    t = time.perf_counter()
    exact = MatchingIndex(ctx.item_tower, ctx.popularity, "exact")
    truth = exact.search(q, w_rel, w_pop, 500)[0]
    exact_ms = (time.perf_counter() - t) / len(q) * 1e3
    one_exact = median_ms(lambda i: exact.search(q[i : i + 1], w_rel[:1], w_pop[:1], 500), 50)
    ann = [("exact (brute force; batched over the 200 queries in brackets)", 0.0, 1.0, one_exact, exact_ms)]
    ivf = MatchingIndex.for_config(ctx, PipelineConfig(matching_index="ivf"))
    default_probe = ivf.nprobe
    for nprobe in sorted({max(1, default_probe // 2), default_probe, min(ivf.nlist, default_probe * 2)}):
        ivf.faiss_index.nprobe = nprobe
        recall = recall_at_k(ivf._probe(q, w_rel, w_pop, 500), truth)
        ms = median_ms(lambda i: ivf.search(q[i : i + 1], w_rel[:1], w_pop[:1], 500), 200)
        mark = " (calibrated default)" if nprobe == default_probe else ""
        ann.append((f"faiss IVF-Flat, nlist {ivf.nlist}, nprobe {nprobe}{mark}", ivf.build_s, recall, ms, None))
        print(f"  (b) {ann[-1][0]}: recall {recall:.3f}, {ms:.2f} ms/query", flush=True)
    ivf.faiss_index.nprobe = default_probe
    if hnsw:
        import faiss

        base = np.concatenate([ctx.item_tower, ctx.popularity[:, None]], axis=1)
        sq = (base * base).sum(1)
        x = np.concatenate([base, np.sqrt(sq.max() - sq)[:, None]], axis=1).astype(np.float32)
        y = np.concatenate([w_rel[:, None] * q, w_pop[:, None], np.zeros((len(q), 1), np.float32)], axis=1).astype(
            np.float32
        )
        t = time.perf_counter()
        index = faiss.IndexHNSWFlat(x.shape[1], 32)
        index.hnsw.efConstruction = 80
        index.add(x)
        build = time.perf_counter() - t
        for ef in (500, 800):
            index.hnsw.efSearch = ef
            recall = recall_at_k(index.search(y, 500)[1], truth)
            ms = median_ms(lambda i: index.search(y[i : i + 1], 500), 200)
            ann.append((f"faiss HNSW-Flat, M 32, efConstruction 80, efSearch {ef}", build, recall, ms, None))
            print(f"  (b) {ann[-1][0]}: build {build:.0f} s, recall {recall:.3f}, {ms:.2f} ms/query", flush=True)
    table = ["| index | build s | recall@500 | ms per query (median) |", "|---|---:|---:|---:|"]
    table += [
        f"| {name} | {b:.1f} | {r:.3f} | {ms:.2f}{'' if batched is None else f' ({batched:.2f})'} |"
        for name, b, r, ms, batched in ann
    ]
    return "\n".join(cascade), "\n".join(table)


# ---------------------------------------------------------------- HTTP, one server configuration per process
def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def serve_config(name: str, rates: list[int], duration: float, warmup: float) -> list[dict]:
    """Child process: start the configuration's server, drive each rate, return the loadgen results."""
    label = SERVERS[name][0]
    server = None
    if name.startswith("uvicorn"):  # the control: one process per core as the Serve app has one replica per core
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.uvicorn_recommend:app", "--port", "8012"]
        cmd += ["--workers", "2"] if name == "uvicorn-2" else []
        server = subprocess.Popen([*cmd, "--log-level", "warning", "--no-access-log"], cwd=ROOT)
        port = 8012
    else:
        from serve_apps.launch import deploy, load_config, start_local_ray

        config = load_config(CONFIG)
        overrides = dict(SERVERS[name][2])
        ingress = overrides.pop("ingress", config["ingress"])
        args = config["applications"][1]["args"]
        if "n_items" in overrides:
            args["world"]["n_items"] = overrides.pop("n_items")
        args.update(overrides, telemetry={"sink": "off"})
        start_local_ray(num_cpus=2, ingress=ingress)
        deploy(config)
        port = 8000
    assert wait_for(f"http://127.0.0.1:{port}/healthz", timeout_s=300), f"{name}: nothing answers on :{port}"
    path, body = "/recommend", {"user_id": 42, "history": [1, 2, 3], "step": 1}
    if name == "feedback":
        served = post(f"http://127.0.0.1:{port}/recommend", body)
        n = len(served["slate"])
        path = "/feedback"
        body = {
            "request_id": served["request_id"],
            "clicked": [True] + [False] * (n - 1),
            "dwell_s": [20.0] + [0.0] * (n - 1),
            "skipped": [False] + [True] * (n - 1),
            "served_record": served["served_record"],
        }
    body_file = tempfile.NamedTemporaryFile("w", delete=False, suffix=".json")
    json.dump(body, body_file)
    body_file.close()
    try:
        tags = {"config": name}
        return drive_rates(port, path, body_file.name, "application/json", rates, duration, warmup, label, tags)
    finally:
        os.unlink(body_file.name)
        stop_server(server)


def batch_cell(result: dict) -> str:
    """Micro-batching: the requests that ran matching together (server-timing's ``matching_batch``), p50 / p99."""
    b = result.get("timings", {}).get("matching_batch")
    return "—" if b is None else f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f}"


def batching(results: list[dict]) -> str:
    """Micro-batching under load: the config's fused app beside the same app without it, rate by rate."""
    lines = [
        "| offered req/s | micro-batched: achieved req/s | p99 ms | requests per batch p50 / p99 | "
        "not batched: achieved req/s | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in results if r.get("config") == "fused" and "failed" not in r):
        off = next(
            (o for o in results if o.get("config") == "fused-unbatched" and o["offered_rps"] == r["offered_rps"]), None
        )
        plain = "— | —" if off is None or "failed" in off else f"{off['achieved_rps']:.0f} | {off['p99_ms']:.1f}"
        lines.append(
            f"| {r['offered_rps']:.0f} | {r['achieved_rps']:.0f} | {r['p99_ms']:.1f} | {batch_cell(r)} | {plain} |"
        )
    return "\n".join(lines)


def where_time_goes(results: list[dict]) -> str:
    """Per configuration at its lowest offered rate: the replica's metrics (p50) and the rest."""
    lines = [
        "| route @ req/s | client p50 | proxy + network (service − app) | in replica (app) | matching | "
        "pre_ranking | ranking | handle hops (3) | agent wait | rest of the handler | requests per batch p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in results:
        if "failed" in r or r["config"] in seen:
            continue
        seen.add(r["config"])
        t = {k: v["p50_ms"] for k, v in r.get("timings", {}).items()}
        app = r.get("app_p50_ms")
        stages = [t.get(s) for s in ("matching", "pre_ranking", "ranking")]
        hops = [t.get(f"{s}_hop") for s in ("matching", "pre_ranking", "ranking")]
        hop = sum(hops) if all(h is not None for h in hops) else None
        known = sum(v for v in [*stages, hop, t.get("agent")] if v is not None)
        rest = None if app is None or stages[0] is None else app - known
        cell = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        proxy = None if app is None else r["service_p50_ms"] - app
        lines.append(
            f"| {r['route']} @ {r['offered_rps']:.0f} | {r['p50_ms']:.2f} | {cell(proxy)} | {cell(app)} | "
            + " | ".join(cell(v) for v in stages)
            + f" | {cell(hop)} | {cell(t.get('agent'))} | {cell(rest)} | {batch_cell(r)} |"
        )
    return "\n".join(lines)


def goals(results: list[dict]) -> str:
    def at(config: str, rate: int) -> dict | None:
        return next((r for r in results if r.get("config") == config and r.get("offered_rps") == rate), None)

    def sustained(config: str) -> float:
        """The highest achieved rate with no errors that kept up with its offered load (≥ 97 %)."""
        kept_up = [
            r["achieved_rps"]
            for r in results
            if r.get("config") == config and r["errors"] == 0 and r["achieved_rps"] >= 0.97 * r["offered_rps"]
        ]
        return max(kept_up, default=0.0)

    rows = []

    def row(goal: str, target: str, value, met: bool | None, control: str = "—") -> None:
        verdict = "—" if met is None else ("yes" if met else "no")
        rows.append(f"| {goal} | {target} | {value} | {verdict} | {control} |")

    def p99(config: str, rate: int) -> str | None:
        r = at(config, rate)
        return r and f"{r['p99_ms']:.1f} ms"

    def p99_goal(goal: str, config: str, rate: int, limit_ms: float, control: str = "—") -> None:
        r = at(config, rate)
        row(goal, f"≤ {limit_ms:.0f} ms", p99(config, rate), r and r["p99_ms"] <= limit_ms, control)

    # the control: the same fused handler without Ray, one uvicorn process per core (what the 2 cores allow)
    p99_goal("fused p99 at 500 req/s (20 000 items)", "fused", 500, 10, p99("uvicorn-2", 500) or "—")
    s = sustained("fused")
    control = f"{sustained('uvicorn-2'):.0f} req/s" if at("uvicorn-2", 200) else "—"
    row("fused sustained without errors (20 000 items)", "≥ 800 req/s", f"{s:.0f} req/s", s >= 800, control)
    p99_goal("fused p99 at 200 req/s (1 000 000 items, IVF)", "fused-1m", 200, 20)
    p99_goal("/feedback p99 at 500 req/s", "feedback", 500, 5)
    off, on = at("fused", 200), at("fused-agent", 200)
    if off and on and "agent" in on.get("timings", {}):
        wait = on["timings"]["agent"]["p99_ms"]
        both = f"end to end p99 {on['p99_ms']:.1f} with, {off['p99_ms']:.1f} ms without (separate runs)"
        row("the utility agent's added p99 at 200 req/s", "≤ 1 ms", f"{wait:.2f} ms in the replica; {both}", wait <= 1)
    header = "| goal | target | measured | met | plain uvicorn control, 2 processes (no Ray) |"
    return "\n".join([header, "|---|---|---|---|---|", *rows])


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, (label, _, _) in SERVERS.items():
        rs = [r for r in results if r.get("config") == config]
        if len(rs) > 1:
            ax.plot([r["offered_rps"] for r in rs], [r["p99_ms"] for r in rs], marker="o", label=label)
    ax.set(xlabel="offered req/s", ylabel="p99 latency, ms (log)", yscale="log", title="/recommend on 2 cores")
    ax.axhline(10, color="grey", ls=":", lw=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "local", "http"], default="all")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--no-hnsw", action="store_true")
    add_load_args(parser, "default", "--serve-config")
    args = parser.parse_args()
    if args.serve_config:
        rates = SERVERS[args.serve_config][1] if args.rates == "default" else [int(r) for r in args.rates.split(",")]
        print("RESULT " + json.dumps(serve_config(args.serve_config, rates, args.duration, args.warmup)), flush=True)
        return
    started = time.time()
    sections = [
        f"# /recommend benchmark\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. "
        "Command: `python benchmarks/recommend.py` (one run; every configuration side by side).\n"
    ]
    if args.part in ("all", "local"):
        print("(a, b) the cascade and matching's index in process", flush=True)
        cascade, ann = local_part(not args.no_hnsw)
        print(cascade + "\n\n" + ann)
        sections.append("## (a) The in-process limit: the cascade, one request at a time\n\n" + cascade + "\n")
        sections.append(
            "## (b) Matching's index at 1 000 000 items\n\nRecall@500 against exact search on 200 held-out queries "
            "(users with 5 random history items, matching's default weights); IVF's probe count is calibrated at "
            "build on 64 other queries to the fewest cells reaching recall ≥ 0.95 (`PipelineConfig.ann_recall`). "
            "Single thread.\n\n" + ann + "\n"
        )
    if args.part in ("all", "http"):
        print("(c) HTTP under fixed offered load", flush=True)
        results = run_server_configs(
            __file__, "--serve-config", args.servers.split(","), [args.rates], args.duration, args.warmup
        )
        with open(RUNS, "w") as f:  # every loadgen result, server-timing metrics included
            json.dump(results, f, indent=1)
        table, breakdown, goal = http_table(results), where_time_goes(results), goals(results)
        batched = batching(results)
        print(goal + "\n\n" + table + "\n\n" + batched + "\n\n" + breakdown)
        plot(results)
        sections.append("## Goals (issue 17)\n\n" + goal + "\n")
        sections.append(
            f"## (c) HTTP under fixed offered load\n\n{args.duration:.0f} s per rate after {args.warmup:.0f} s "
            "warm-up; "
            "64 keep-alive connections; open loop from `benchmarks/loadgen` (latency from each request's due time) on "
            "the same 2 cores as the servers; `serve_apps/configs/recommend.yaml` (HAProxy ingress with Serve's "
            "throughput mode, 2 recommend replicas, micro-batching ≤ 8) unless named; telemetry off. In-replica = the "
            "app's `server-timing` `app` metric.\n\n" + table + "\n\n![p99 against offered load](recommend.png)\n"
        )
        sections.append(
            "### Micro-batching\n\nThe config's app (`micro_batch: 8`: requests already waiting in a replica run the "
            "cascade as one batch, with no wait for more) beside the same app with `micro_batch: 1`, from the table "
            "above; requests per batch from the replicas' `matching_batch` server-timing metric.\n\n" + batched + "\n"
        )
        sections.append(
            "## (d) Where the time goes (p50 ms, each configuration at its lowest offered rate)\n\n" + breakdown + "\n"
        )
    print(f"wall time {time.time() - started:.0f} s")
    write_results(RESULTS, sections, partial=args.part != "all")


if __name__ == "__main__":
    main()
