"""Learner scaling: UNEX-RL's update networks at growing minibatch sizes, on CPU threads and on a GPU, side by side.

    python benchmarks/learner_scaling.py                 # here: CPU with this machine's threads (and 2)
    python benchmarks/learner_scaling.py --results DIR   # where the page goes (e.g. on a machine with a GPU)

One update of the networks rllib_policies/unex_rl/learner.py trains (the learning test's shapes: o_1 of 62 features,
the joint action of 4 + 3 + 3 parameters): the global critic's TD step (the three target stage policies' next joint
action, y = r + γ·Q'_g, Adam on (Q_g − y)²), the actor step (the stage policies' joint action through the frozen
critic, Adam on −Q_g) and Polyak averaging of the four target networks. It leaves out what is not a network: the
cascade replay of the cascading information chain (NumPy, on the CPU wherever the learner runs) and the buffer's
sampling, so the ratios are an upper bound on what a GPU learner gains for UNEX-RL. Median of 30 timed updates
after 5 warm-up ones per cell; on CUDA each update ends with a synchronize. Needs torch and numpy only.
Writes benchmarks/results/learner_scaling.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine  # noqa: E402
from rllib_policies.building_blocks import mlp  # noqa: E402

OBS_DIM, ACTION_DIMS, GAMMA, TAU = 62, (4, 3, 3), 0.5, 0.01
BATCHES = (256, 1024, 4096, 16384, 65536)


class Networks(torch.nn.Module):
    """The stage policies μ_k (62 → 64 → 64 → |a_k|, sigmoid), the global critic Q_g (62 + 10 → 128 → 128 → 1) and
    their target copies, as UNEX-RL builds them."""

    def __init__(self):
        super().__init__()
        self.pi = torch.nn.ModuleList([mlp(OBS_DIM, (64, 64), d) for d in ACTION_DIMS])
        self.q = mlp(OBS_DIM + sum(ACTION_DIMS), (128, 128), 1)
        self.target_pi = torch.nn.ModuleList([mlp(OBS_DIM, (64, 64), d) for d in ACTION_DIMS])
        self.target_q = mlp(OBS_DIM + sum(ACTION_DIMS), (128, 128), 1)
        self.target_pi.load_state_dict(self.pi.state_dict())
        self.target_q.load_state_dict(self.q.state_dict())

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        return torch.cat([torch.sigmoid(p(obs)) for p in (self.target_pi if target else self.pi)], dim=-1)


def update_fn(nets: Networks):
    critic_opt = torch.optim.Adam(nets.q.parameters(), lr=1e-3)
    actor_opt = torch.optim.Adam(nets.pi.parameters(), lr=3e-4)
    pairs = [(nets.q, nets.target_q), (nets.pi, nets.target_pi)]

    def update(batch: dict) -> None:
        with torch.no_grad():
            y = batch["reward"] + GAMMA * (1 - batch["done"]) * nets.target_q(
                torch.cat([batch["next_obs"], nets.act(batch["next_obs"], target=True)], -1)
            ).squeeze(-1)
        q = nets.q(torch.cat([batch["obs"], batch["action"]], -1)).squeeze(-1)
        critic_opt.zero_grad()
        ((q - y) ** 2).mean().backward()
        critic_opt.step()
        nets.q.requires_grad_(False)
        actor_loss = -nets.q(torch.cat([batch["obs"], nets.act(batch["obs"])], -1)).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        nets.q.requires_grad_(True)
        with torch.no_grad():
            for net, target in pairs:
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.lerp_(p, TAU)

    return update


def median_update_ms(device: str, batch_size: int, repeats: int = 30, warmup: int = 5) -> float:
    torch.manual_seed(0)
    nets = Networks().to(device)
    update = update_fn(nets)
    g = torch.Generator(device="cpu").manual_seed(batch_size)
    batch = {
        "obs": torch.randn(batch_size, OBS_DIM, generator=g),
        "next_obs": torch.randn(batch_size, OBS_DIM, generator=g),
        "action": torch.rand(batch_size, sum(ACTION_DIMS), generator=g),
        "reward": torch.rand(batch_size, generator=g),
        "done": (torch.rand(batch_size, generator=g) < 0.1).float(),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        update(batch)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def reading(ms: dict, settings: list, label: dict, batches: list[int]) -> str:
    """The table in words: each setting's speed against the first one's at the smallest and the largest minibatch,
    and how little CUDA's time per update moves with the minibatch."""
    base = settings[0]
    words = [
        f"At minibatch {b}, against {label[base]}: "
        + ", ".join(f"{label[s]} {ms[(*base, b)] / ms[(*s, b)]:.1f}×" for s in settings[1:])
        + "."
        for b in (batches[0], batches[-1])
        if len(settings) > 1
    ]
    cuda = [v for (device, _, _), v in ms.items() if device == "cuda"]
    if cuda:
        words.append(
            f"CUDA's time per update stays within {min(cuda):.1f}–{max(cuda):.1f} ms at every minibatch: at these "
            "widths (64- and 128-unit layers) an update is a few dozen small kernel launches, and the minibatch is "
            "nearly free until it outgrows them."
        )
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"), help="where the page goes")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    settings = [("cpu", t) for t in sorted({2, cores})]
    if torch.cuda.is_available():
        settings.append(("cuda", cores))
    started = time.perf_counter()
    ms: dict[tuple[str, int, int], float] = {}
    for device, threads in settings:
        torch.set_num_threads(threads)
        for b in args.batches:
            ms[device, threads, b] = median_update_ms(device, b)
            print(
                f"  {device} ({threads} threads) minibatch {b:>6}: {ms[device, threads, b]:8.2f} ms/update", flush=True
            )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    label = {s: f"{s[0].upper()} {s[1]} threads" if s[0] == "cpu" else f"CUDA ({gpu})" for s in settings}
    base = settings[0]
    columns = ["minibatch", *(f"{label[s]}: ms / update" for s in settings)]
    columns += [f"{label[s]}: transitions / s" for s in settings]
    columns += [f"{label[s]} vs {label[base]}" for s in settings[1:]]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for b in args.batches:
        cells = [str(b), *(f"{ms[(*s, b)]:.2f}" for s in settings)]
        cells += [f"{b / ms[(*s, b)] * 1e3:,.0f}" for s in settings]
        cells += [f"{ms[(*base, b)] / ms[(*s, b)]:.1f}×" for s in settings[1:]]
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "learner_scaling.md")
    with open(path, "w") as f:
        f.write(
            "# Learner scaling: UNEX-RL's update networks by minibatch size and device\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, torch {torch.__version__}"
            f"{f', {gpu}' if gpu else ''}. Command: "
            f"`python benchmarks/learner_scaling.py` ({time.perf_counter() - started:.0f} s, one run, every cell "
            "side by side). One update = the critic's TD step, the actor step through the frozen critic and the "
            "target networks' Polyak step (the module docstring); median of 30 updates. UNEX-RL trains at "
            "minibatch 256 (`minibatch_size`).\n\n" + table + "\n\n" + reading(ms, settings, label, args.batches) + "\n"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
