"""Do the offline critics resolve the misaligned logs' in-support gain? Each learner's own policy against a policy
that picks, in every state, the logged action its critic rates highest (issue 13).

A learner that keeps to the logged actions can reach at most the support ceiling (the best static weights inside
the behaviour's 95 % region). Whether its critic sees that gain is separate from whether its policy extraction
reaches it: this trains BCQ, IQL and CQL on the misaligned logs at the offline benchmark's budget (8 × 100 steps
of 256) and then serves, besides the learner's own policy, argmax_k Q(s, a_k) over K actions drawn from the logs
(the same K for every state; Q = the min of the twin critics), and, for CQL and IQL, the critic's pick among its
own policy's mean and N samples (``selection_samples``, IDQL's extraction). Where the selection gains and the
learner's policy does not, the extraction is short; where the selection does not gain either, the critic is.

    python benchmarks/offline_critic_selection.py            # 3 learners × 2 seeds (about 10 min)
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
from actors.stages import RANKING_ACTION_HIGH  # noqa: E402
from benchmarks.common import init_local_ray, machine, misaligned_logs, write_results  # noqa: E402
from rllib_policies.offline.data import (  # noqa: E402
    MISALIGNED_WEIGHTS,
)
from rllib_policies.offline.experiment import OfflineSpec, build_learner  # noqa: E402
from rllib_policies.offline.shipped import SHIPPED, to_unit  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "offline_critic_selection.md")
LEARNERS = ("bcq", "iql", "cql")


@torch.no_grad()
def critic_q(learner, name: str, obs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """min of the twin critics at (obs [B, d], ranking weights [B, 3]) in each learner's own action coordinates."""
    if name in SHIPPED:  # RLlib's: the unit box [−1, 1]
        return learner.q_values(obs, torch.as_tensor(to_unit(weights.numpy(), learner.action_scale)))
    module = learner.inference_module()  # ours: the unit cube a / a_max
    return torch.minimum(*module.critic(obs, weights / torch.as_tensor(RANKING_ACTION_HIGH)))


def selection(learner, name: str, candidates: np.ndarray):
    """The policy obs → the candidate (ranking weights [K, 3]) with the highest Q in each state."""
    cand = torch.as_tensor(candidates, dtype=torch.float32)
    k = len(cand)

    def policy(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(np.asarray(obs, np.float32))
        q = critic_q(learner, name, o.repeat_interleave(k, 0), cand.repeat(len(o), 1)).reshape(len(o), k)
        return candidates[q.argmax(1).numpy()]

    return policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--candidates", type=int, nargs="+", default=[16, 256], help="K logged actions to pick among")
    p.add_argument(
        "--samples", type=int, nargs="*", default=[64], help="N of its policy's samples to pick among (CQL, IQL)"
    )
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--updates", type=int, default=100, help="gradient steps per iteration")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()

    init_local_ray(num_cpus=2)
    t_start = time.time()
    spec = OfflineSpec(iterations=args.iterations, updates_per_iteration=args.updates)
    logs = misaligned_logs(spec, "critic-selection-")
    path, rows, value, ceiling = logs.path, logs.rows, logs.value, logs.ceiling
    behaviour = value(MISALIGNED_WEIGHTS)
    lines = [
        "| learner | seed | its own policy (CQL, IQL: its mean): V | "
        + " | ".join(f"critic's pick among {k} logged: V | its mean weights" for k in args.candidates)
        + "".join(f" | pick among its mean and {n} samples: V | its mean weights" for n in args.samples)
        + " | train s |",
        "|---|---:|---:|" + "---:|---|" * (len(args.candidates) + len(args.samples)) + "---:|",
    ]
    for name in args.learners:
        for seed in range(args.seeds):
            learner = build_learner(name, path, seed=seed, spec=spec)
            try:
                t0 = time.time()
                for _ in range(args.iterations):
                    learner.train()
                train_s = time.time() - t0
                if name in SHIPPED:
                    learner.selection_samples = 0  # its policy's mean
                cells = [f"{value(learner.policy_weights):.2f}"]
                rng = np.random.default_rng(seed)
                for k in args.candidates:
                    candidates = rows["actions"][rng.choice(len(rows["actions"]), k, replace=False)]
                    policy = selection(learner, name, np.asarray(candidates, np.float32))
                    picked = policy(rows["obs"][rows["t"] == 0]).mean(0)
                    cells += [f"{value(policy):.2f}", f"({', '.join(f'{x:.3f}' for x in picked)})"]
                for n in args.samples:  # the served policy with ``selection_samples`` n (ShippedOffline._select)
                    if name not in SHIPPED:
                        cells += ["—", "—"]
                        continue
                    learner.selection_samples = n
                    picked = learner.policy_weights(rows["obs"][rows["t"] == 0]).mean(0)
                    cells += [f"{value(learner.policy_weights):.2f}", f"({', '.join(f'{x:.3f}' for x in picked)})"]
            finally:
                learner.stop()
            row = f"| {name} | {seed} | " + " | ".join(cells) + f" | {train_s:.0f} |"
            lines.append(row)
            print(row, flush=True)
    wall = time.time() - t_start
    command = (
        f"python benchmarks/offline_critic_selection.py --learners {' '.join(args.learners)} --seeds {args.seeds} "
        f"--candidates {' '.join(map(str, args.candidates))} --samples {' '.join(map(str, args.samples))} "
        f"--iterations {args.iterations} --updates {args.updates}"
    )
    sections = [
        "# The offline critics on the misaligned logs: their own policy against their pick among logged actions",
        "",
        f"Machine: {machine()}. Command: `{command}` — {wall:.0f} s wall. The offline benchmark's world, logs "
        f"({len(np.unique(rows['eps_id']))} sessions, {len(rows['rewards'])} transitions) and budget.",
        "",
        f"True V on {spec.eval_sessions} sessions, with the same random numbers for every policy: the behaviour's "
        f"centre (0.05, 1, 0.05) {behaviour:.2f}; the support ceiling "
        f"({', '.join(f'{x:.3f}' for x in ceiling.weights)}) {ceiling.value.mean():.2f}. The critic's pick: in every "
        "state the candidate with the highest min-of-twins Q, the candidates K actions drawn once from the logs "
        "(per seed); its mean weights over the logged session starts. The pick among its policy's samples (CQL and "
        "IQL; BCQ's policy already picks among its generator's): `selection_samples` N, in every state the highest "
        "Q among the policy's mean and N actions sampled from it, as `ShippedOffline` serves it.",
        "",
        *lines,
        "",
    ]
    write_results(args.results, sections, partial=False)


if __name__ == "__main__":
    main()
