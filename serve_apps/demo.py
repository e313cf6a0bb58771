"""The main job (for now): the inner-reward service end to end on a local Ray.

Starts a private local Ray, deploys serve_apps/configs/inner_reward.yaml, scores a micro-batch
of simulated slates over HTTP (JSON and Arrow IPC), hot-swaps the weights the way the outer
controller will, scores again, prints a table, and shuts everything down.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import httpx
import numpy as np
import pyarrow as pa

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "inner_reward.yaml")


def simulated_slates(n_slates: int, slate_size: int, seed: int) -> list[dict]:
    """Feedback for n_slates slates: position-biased clicks, Weibull-ish dwell, skips."""
    rng = np.random.default_rng(seed)
    examine = 1.0 / np.arange(1, slate_size + 1) ** 1.0  # PBM, η = 1 (shared/WORLD_FACTS.md)
    relevance = rng.beta(2, 5, size=(n_slates, slate_size)).astype(np.float32)
    clicked = rng.random((n_slates, slate_size)) < examine * relevance
    dwell = np.where(clicked, 9.6 * rng.weibull(1.3, size=clicked.shape), 0.0).astype(np.float32)
    skipped = ~clicked & (rng.random(clicked.shape) < examine * 0.5)
    return [{"clicked": clicked[i].tolist(), "dwell_s": dwell[i].tolist(), "skipped": skipped[i].tolist(),
             "relevance": relevance[i].tolist()} for i in range(n_slates)]


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slates", type=int, default=8)
    parser.add_argument("--slate-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    # The Python proxy starts and stops fastest; HAProxy (the config's choice for serving) waits
    # ~30 s for its controller to drain on shutdown. Both are measured in benchmarks/.
    parser.add_argument("--ingress", default="default", help="default | haproxy | direct | throughput")
    args = parser.parse_args(argv)

    from ray import serve
    import ray

    from serve_apps.launch import deploy, load_config, start_local_ray

    config = load_config(CONFIG)
    ingress = args.ingress
    t0 = time.perf_counter()
    print(f"starting local Ray + Serve (ingress={ingress}) ...", flush=True)
    start_local_ray(ingress=ingress)
    deploy(config)
    url = f"http://127.0.0.1:{config.get('http_options', {}).get('port', 8000)}"
    print(f"inner-reward service up at {url} in {time.perf_counter() - t0:.1f}s")
    try:
        slates = simulated_slates(args.slates, args.slate_size, args.seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            first = http.post("/reward", json={"slates": slates}).raise_for_status().json()
            weights = http.get("/weights").json()
            new = {**weights["weights"], "click_w": 2.0, "skip_penalty": -0.6}
            put = http.put("/weights", json={**new, "expected_version": weights["version"]}).raise_for_status().json()
            second = http.post("/reward", json={"slates": slates}).raise_for_status().json()
            table = pa.table({"slate": np.repeat(np.arange(len(slates)), args.slate_size).astype(np.int32),
                              **{k: np.concatenate([s[k] for s in slates]) for k in slates[0]}})
            table = table.cast(table.schema.set(table.schema.get_field_index("dwell_s"), pa.field("dwell_s", pa.float32()))
                               .set(table.schema.get_field_index("relevance"), pa.field("relevance", pa.float32())))
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            arrow = http.post("/reward/arrow", content=sink.getvalue(),
                              headers={"content-type": "application/vnd.apache.arrow.stream"}).raise_for_status()
            arrow_rewards = pa.ipc.open_stream(arrow.content).read_all()["reward"].to_numpy()
            bad = http.post("/reward", json={"slate": {**slates[0], "dwell_s": [-1.0] * args.slate_size}})

        rows = [(i, sum(s["clicked"]), sum(s["skipped"]), f"{np.mean(s['dwell_s']):.2f}",
                 f"{first['totals'][i]:.3f}", f"{second['totals'][i]:.3f}") for i, s in enumerate(slates)]
        print_table(f"Inner reward per slate ({args.slate_size} items each)", rows,
                    ("slate", "clicks", "skips", "mean dwell s", f"total v{first['weights_version']}",
                     f"total v{second['weights_version']}"))
        print(f"\nweights v{weights['version']} -> v{put['version']}: click_w 1.0 -> 2.0, skip_penalty -0.3 -> -0.6 "
              f"(acked by {put['readers_acked']}/{put['readers_live']} replicas)")
        agree = np.allclose(arrow_rewards, np.concatenate(second["rewards"]), atol=1e-5)
        print(f"Arrow IPC route agrees with JSON route: {agree}")
        print(f"bad input (negative dwell) -> HTTP {bad.status_code}: {bad.json()['detail'][0]['msg']}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
