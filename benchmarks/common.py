"""Helpers shared by the benchmarks: the open-loop load generator, waiting for servers, machine info."""

from __future__ import annotations

import json
import os
import platform
import subprocess
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
