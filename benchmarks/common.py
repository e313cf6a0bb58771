"""Helpers shared by the benchmarks (and the tests): the open-loop load generator, waiting for servers,
machine info, child processes stopped by the ids they were started with, a private redis-server."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_DIR = os.path.join(ROOT, "benchmarks", "loadgen")
LOADGEN = os.path.join(LOADGEN_DIR, "target", "release", "loadgen")


def build_loadgen() -> None:
    """Build benchmarks/loadgen (std-only Rust, offline)."""
    subprocess.run(
        ["cargo", "build", "--release", "-q", "--manifest-path", os.path.join(LOADGEN_DIR, "Cargo.toml")],
        check=True,
        cwd=ROOT,
    )


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


def run_loadgen(
    port: int, path: str, body_file: str, content_type: str, rate: int, duration: float, warmup: float
) -> dict:
    cmd = [
        LOADGEN,
        "--url",
        f"http://127.0.0.1:{port}{path}",
        "--body",
        body_file,
        "--content-type",
        content_type,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--connections",
        "64",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def drive_rates(
    port: int,
    path: str,
    body_file: str,
    content_type: str,
    rates,
    duration: float,
    warmup: float,
    label: str,
    tags: dict | None = None,
) -> list[dict]:
    """A benchmark child's load loop: each offered rate in turn (``run_loadgen``), tagged with ``route=label``
    and ``tags``, a progress line per rate on stderr (the parent echoes lines holding " @ ")."""
    results = []
    for rate in rates:
        res = run_loadgen(port, path, body_file, content_type, rate, duration, warmup)
        res.update(route=label, **(tags or {}))
        results.append(res)
        print(
            f"    {label} @ {rate} req/s: achieved {res['achieved_rps']}, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} "
            f"ms, in-replica p99 {res['app_p99_ms']} ms, errors {res['errors']}",
            file=sys.stderr,
            flush=True,
        )
    return results


def stop_server(server: subprocess.Popen | None) -> None:
    """A benchmark child's clean-up: the plain-uvicorn control process, else Serve and the local Ray."""
    if server is not None:
        server.terminate()
        server.wait()
        return
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# ---------------------------------------------------------------- child processes, by id
def _processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, start time in clock ticks) of every running process (Linux /proc)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, …
            except OSError:
                continue
            if fields[0] != "Z":  # a zombie has exited already
                table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live process below ``pid``."""
    table = _processes()
    children = defaultdict(list)
    for p, (parent, _) in table.items():
        children[parent].append(p)
    found, stack = set(), [pid]
    while stack:
        for child in children[stack.pop()]:
            found.add((child, table[child][1]))
            stack.append(child)
    return found


def still_running(started: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The processes of ``started`` (pid, start time) that still run; a reused pid does not count."""
    table = _processes()
    return {(pid, start) for pid, start in started if table.get(pid, (0, None))[1] == start}


def stop_processes(started: set[tuple[int, int]], grace_s: float = 5.0) -> None:
    """SIGTERM each process in ``started`` that still runs, then SIGKILL any left after ``grace_s``.
    Matched on (pid, start time), so a reused pid is never hit."""

    def alive() -> set[tuple[int, int]]:
        return still_running(started)

    def signal_all(procs: set[tuple[int, int]], sig: int) -> None:
        for pid, _ in procs:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal_all(alive(), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_all(left, signal.SIGKILL)


def sigterm_when_ready(cmd: list[str], ready: str, env: dict, timeout_s: float = 60, grace_s: float = 10) -> dict:
    """Start ``cmd``, wait for an output line starting with ``ready``, send SIGTERM (what Kubernetes, systemd and
    `ray job stop` send) and wait for it to exit → {"returncode", "output", "stop_s" (SIGTERM → exit), "left" (the
    command lines of processes it had started that still ran ``grace_s`` after it exited)}. Killed if still running
    after ``timeout_s``; what it started is stopped in any case."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: set[tuple[int, int]] = set()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready):
                break
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited before {ready!r}:\n{''.join(lines)[-3000:]}")
        started = descendants(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout_s)
        stop_s = time.monotonic() - t0
        deadline = time.monotonic() + grace_s
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = []
        for pid, _ in still_running(started):
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    left.append(f.read().replace("\0", " ")[:160])
            except OSError:
                pass
        return {"returncode": proc.returncode, "output": "".join(lines) + out, "stop_s": stop_s, "left": left}
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_processes(started)


def run_tracked(cmd: list[str], timeout_s: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that notes every process the child
    starts while it runs (Ray's, and the HAProxy Serve starts) and, once the child exits, stops those
    still running, by pid. On timeout the child is killed too, and TimeoutExpired raised. Output goes
    through temporary files, so nothing left holding the child's stdout can stall the caller."""
    started: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen_kwargs)
        try:
            while proc.poll() is None:
                started |= descendants(proc.pid)
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(cmd, timeout_s)
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            stop_processes(started)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


class RedisServer:
    """A private redis-server on a free loopback port, stoppable and restartable (same data dir)."""

    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server (scripts/bootstrap.sh does)")
        self.exe, self.dir = exe, tempfile.mkdtemp(prefix="morl-redis-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> RedisServer:
        # appendonly + fsync always: a restart keeps every acknowledged write
        cmd = [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError("redis-server did not start")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL with kill=True; appendfsync always keeps every acknowledged write)."""
        if self.proc is not None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- reporting
def init_local_ray(num_cpus: int = 2) -> None:
    """A benchmark's own local Ray: ``num_cpus`` CPUs, its RAY_TMPDIR (a fresh one unless set), no dashboard, no
    worker logs on the driver."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-bench-"))
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def init_ray_worker() -> None:
    """A benchmark process's own local Ray (one CPU) and one torch thread: runs of tiny networks in parallel
    processes only contend on shared cores otherwise."""
    import torch

    torch.set_num_threads(1)
    init_local_ray(num_cpus=1)


def misaligned_logs(spec, prefix: str) -> SimpleNamespace:
    """The offline benchmark's misaligned logs (2 days × 500 sessions of ``spec``'s world, written into a fresh
    temporary folder named ``prefix``…) and what the offline diagnostics measure on them: ``path``, ``rows``,
    ``value(policy)`` (the mean true V on ``spec``'s evaluation users, common random numbers) and the behaviour's
    support ``ceiling``."""
    from actors.cascade import build_world
    from rllib_policies.offline.data import eval_users, read_rows, support_ceiling, true_value, write_dataset

    path = write_dataset("misaligned", spec.env_config, tempfile.mkdtemp(prefix=prefix), 2, 500)["path"]
    _, pipeline = build_world(spec.env_config)
    users = eval_users(pipeline, spec.eval_sessions, spec.eval_seed)

    def value(policy) -> float:
        return float(true_value(pipeline, policy, users, spec.eval_seed).mean())

    ceiling = support_ceiling("misaligned", pipeline, users, spec.eval_seed)
    return SimpleNamespace(path=path, rows=read_rows(path), value=value, ceiling=ceiling)


def machine() -> str:
    """The CPU, its cores and the versions a result depends on (Ray where it is installed: a GPU machine may
    have torch alone)."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.machine(),
    )
    try:
        import ray

        ray_version = f", Ray {ray.__version__}"
    except ImportError:
        ray_version = ""
    versions = f"Python {platform.python_version()}{ray_version}, NumPy {np.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, {versions}"


def http_table(results: list[dict]) -> str:
    lines = [
        "| route | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | in-replica p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['route']} | — | failed: {r['failed'][:80]} | | | | | |")
            continue
        app = f"{r['app_p50_ms']} / {r['app_p99_ms']}" if r.get("app_p99_ms") is not None else "—"
        lines.append(
            f"| {r['route']} | {r['offered_rps']:.0f} | {r['achieved_rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {app} | {r['errors']} |"
        )
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


def save_plot(path, plot, *args) -> None:
    """``plot(path, *args)``, or a line saying it was skipped when matplotlib (a benchmark extra) is missing."""
    try:
        plot(path, *args)
    except ImportError:
        print(f"matplotlib not installed: {os.path.basename(str(path))} skipped", flush=True)


def write_marked_section(path: str, name: str, section: str, title: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the page at ``path``
    (appending the markers with the section when absent; a new page starts with ``title``), keeping every
    other section: several scripts write one results page."""
    text = open(path).read() if os.path.exists(path) else f"# {title}\n"
    block = f"<!-- {name}:start -->\n{section.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def run_server_configs(
    script: str,
    child_flag: str,
    names: list[str],
    rates: list[int],
    duration: float,
    warmup: float,
    label=lambda name: name,
) -> list[dict]:
    """Run each server configuration in its own process (Ray reads the ingress from the environment
    at start): ``script child_flag NAME`` prints ``RESULT <json list>``; its progress lines (those
    holding "@") are echoed. A failed configuration becomes a row saying so."""
    build_loadgen()
    results = []
    for name in names:
        print(f"  {label(name)} ...", flush=True)
        cmd = [
            sys.executable,
            script,
            child_flag,
            name,
            "--rates",
            ",".join(map(str, rates)),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ]
        out = run_tracked(cmd, timeout_s=1200, cwd=ROOT)  # then stops what it left (e.g. a bound HAProxy)
        sys.stderr.write("\n".join(line for line in out.stderr.splitlines() if " @ " in line) + "\n")
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"  {label(name)} failed:\n{out.stderr[-3000:]}", flush=True)
            results.append({"route": label(name), "failed": (out.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            results.extend(json.loads(lines[-1][len("RESULT ") :]))
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
