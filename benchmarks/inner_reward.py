"""Inner-reward benchmark: (a) the kernel in process, (b) the Serve app under fixed offered load.

    python benchmarks/inner_reward.py                 # both parts, ~8 minutes on 2 cores
    python benchmarks/inner_reward.py --part kernel   # (a) only
    python benchmarks/inner_reward.py --routes haproxy,direct --rates 200,500 --duration 5

(a) Rust vs NumPy vs pure Python at slate sizes 1 … 1 000 000: per-call time and ns/item
    (medians of repeated timings).
(b) Each Serve ingress route runs in its own process (Ray reads the ingress from the environment
    at start), with one 100-item slate per request, driven by benchmarks/loadgen (open loop,
    fixed offered rate, latency measured from each request's due time). "in-replica" is the
    server-timing header: request in → response start inside the replica's ASGI app.
Writes benchmarks/results/inner_reward.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import timeit
from functools import partial

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rust_ext  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_load_args,
    drive_rates,
    find_port,
    http_table,
    machine,
    run_server_configs,
    stop_server,
    wait_for,
    write_results,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "inner_reward.md")
CONFIG = os.path.join(ROOT, "serve_apps", "configs", "inner_reward.yaml")

# route name -> (ingress, replicas, body kind, access log)
ROUTES = {
    "default": ("default", 1, "json", False),
    "haproxy": ("haproxy", 1, "json", False),
    "haproxy-accesslog": ("haproxy", 1, "json", True),
    "haproxy-2replicas": ("haproxy", 2, "json", False),
    "haproxy-arrow": ("haproxy", 1, "arrow", False),
    "direct": ("direct", 1, "json", False),
    "throughput": ("throughput", 1, "json", False),
    "uvicorn-control": (None, 1, "json", False),
}


# ---------------------------------------------------------------- (a) kernel in process
def make_slate(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.random(n) < 0.3,
        rng.exponential(10, n).astype(np.float32),
        rng.random(n) < 0.2,
        rng.random(n).astype(np.float32),
    )


def numpy_expression(c, d, s, r, w=(1.0, 0.5, -0.3, 0.8), lo=-5.0, hi=5.0):
    """The plain NumPy expression a user would write (float32, no input checks)."""
    f = np.float32
    return np.clip(f(w[0]) * c + f(w[1]) * np.log1p(d) + f(w[2]) * s + f(w[3]) * r, lo, hi)


def pure_python(c, d, s, r, w=(1.0, 0.5, -0.3, 0.8), lo=-5.0, hi=5.0):
    return [
        min(hi, max(lo, w[0] * ci + w[1] * math.log1p(di) + w[2] * si + w[3] * ri))
        for ci, di, si, ri in zip(c.tolist(), d.tolist(), s.tolist(), r.tolist())
    ]


def median_time(fn, budget_s: float = 0.4) -> float:
    once = timeit.timeit(fn, number=1)
    number = max(1, int(budget_s / 7 / max(once, 1e-7)))
    return float(np.median(timeit.repeat(fn, number=number, repeat=7))) / number


def one_thread(parts) -> list[np.ndarray]:
    """The kernel on chunks below PARALLEL_MIN_ITEMS, one call each (no thread split)."""
    return [rust_ext.inner_reward(*p[:4], None, p[4]) for p in parts]


def kernel_part() -> list[dict]:
    rows = []
    for n in (1, 10, 100, 10_000, 1_000_000):
        c, d, s, r = make_slate(n)
        out = np.empty(n, np.float32)
        impls = {
            "rust": partial(rust_ext.inner_reward, c, d, s, r),
            "rust (out=)": partial(rust_ext.inner_reward, c, d, s, r, None, out),
            "numpy": partial(numpy_expression, c, d, s, r),
            "python": partial(pure_python, c, d, s, r),
        }
        if n >= rust_ext.PARALLEL_MIN_ITEMS:
            k = rust_ext.PARALLEL_MIN_ITEMS // 2
            parts = [(c[i : i + k], d[i : i + k], s[i : i + k], r[i : i + k], out[i : i + k]) for i in range(0, n, k)]
            impls["rust (1 thread)"] = partial(one_thread, parts)
        times = {name: median_time(fn) for name, fn in impls.items()}
        for name, t in times.items():
            rows.append(
                {
                    "n": n,
                    "impl": name,
                    "us_per_call": t * 1e6,
                    "ns_per_item": t * 1e9 / n,
                    "vs_numpy": times["numpy"] / t,
                }
            )
        print(f"  n={n:>9,}: " + "  ".join(f"{k} {v * 1e6:,.2f}µs" for k, v in times.items()), flush=True)
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| items | implementation | µs / call | ns / item | speed-up vs NumPy |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['impl']} | {r['us_per_call']:,.2f} | {r['ns_per_item']:,.2f} | {r['vs_numpy']:.2f}× |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- (b) HTTP load
def request_body(kind: str, n: int = 100) -> tuple[bytes, str]:
    c, d, s, r = make_slate(n, seed=1)
    if kind == "json":
        slate = {"clicked": c.tolist(), "dwell_s": d.tolist(), "skipped": s.tolist(), "relevance": r.tolist()}
        return json.dumps({"slate": slate}).encode(), "application/json"
    import pyarrow as pa

    table = pa.table({"clicked": c, "dwell_s": d, "skipped": s, "relevance": r})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue(), "application/vnd.apache.arrow.stream"


def serve_route(route: str, rates: list[int], duration: float, warmup: float) -> list[dict]:
    """Child process: start the route's server, drive each rate, print JSON results."""
    ingress, replicas, body_kind, access_log = ROUTES[route]
    body, content_type = request_body(body_kind)
    body_file = tempfile.NamedTemporaryFile(delete=False, suffix=".body")
    body_file.write(body)
    body_file.close()
    path = "/reward/arrow" if body_kind == "arrow" else "/reward"
    server = None
    if ingress is None:  # plain uvicorn + FastAPI, no Ray: the same handler code
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.uvicorn_control:app",
                "--port",
                "8011",
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
        )
        port = 8011
        assert wait_for(f"http://127.0.0.1:{port}/healthz"), "uvicorn control did not start"
    else:
        from serve_apps.launch import deploy, load_config, start_local_ray

        config = load_config(CONFIG)
        config["applications"][0]["args"]["num_replicas"] = replicas
        config["logging_config"]["enable_access_log"] = access_log
        start_local_ray(num_cpus=2, ingress=ingress)
        deploy(config)
        port = 8000
        if ingress in ("direct", "throughput"):
            port = find_port(range(30000, 30010)) or 8000
        assert wait_for(f"http://127.0.0.1:{port}/healthz"), f"{route}: nothing answers on :{port}"
    try:
        return drive_rates(port, path, body_file.name, content_type, rates, duration, warmup, route, {"port": port})
    finally:
        os.unlink(body_file.name)
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "kernel", "http"], default="all")
    parser.add_argument("--routes", default=",".join(ROUTES))
    add_load_args(parser, "200,500,1000", "--serve-route")
    args = parser.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    if args.serve_route:
        print("RESULT " + json.dumps(serve_route(args.serve_route, rates, args.duration, args.warmup)), flush=True)
        return

    sections = [
        f"# Inner reward benchmark\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{machine()}. Command: `python benchmarks/inner_reward.py` (one run; medians).\n"
    ]
    if args.part in ("all", "kernel"):
        print("(a) kernel in process", flush=True)
        table = kernel_table(kernel_part())
        print(table)
        sections.append(
            "## (a) The kernel in process\n\nMedian of 7 repeats. `rust` allocates its output; "
            "`rust (out=)` writes into a caller's array; `numpy` is the plain float32 expression "
            "with no input checks (the Rust kernel also validates every item).\n\n" + table + "\n"
        )
    if args.part in ("all", "http"):
        print("(b) Serve app under fixed offered load (100-item slates)", flush=True)
        results = run_server_configs(
            __file__,
            "--serve-route",
            args.routes.split(","),
            rates,
            args.duration,
            args.warmup,
            label=lambda r: f"route {r}",
        )
        table = http_table(results)
        print(table)
        sections.append(
            f"## (b) HTTP under fixed offered load\n\nOne 100-item slate per request; {args.duration:.0f} s per rate "
            f"after {args.warmup:.0f} s warm-up; 64 keep-alive connections; open-loop load from "
            "`benchmarks/loadgen` on the same 2 cores as the server. Latency runs from each request's due time "
            "(includes queueing at the client when the server falls behind). In-replica = the app's "
            "`server-timing` (request in → response start: JSON parse, validation, kernel, serialisation).\n\n"
            + table
            + "\n"
        )
    write_results(RESULTS, sections, partial=args.part != "all")


if __name__ == "__main__":
    main()
