"""Why RLlib's IQL stays near the misaligned behaviour (issue 13): its advantage weights, per iteration.

IQL extracts its policy by advantage-weighted regression: the actor maximises mean exp(β·A)·log π(a|s) over the
logged (s, a), A = Q_target(s, a) − V(s), each weight clipped at 100. For a state-independent Gaussian the
maximiser is the weighted mean of the logged actions in the policy's own (pre-tanh) coordinates, so this prints,
per iteration of the offline benchmark's budget (8 × 100 steps of 256) on the default world's misaligned logs:

- A against the target critics the actor used during the iteration (RLlib copies them once per ``train()``) and V
  at the iteration's end: its mean and standard deviation, the weights' effective sample size (ESS / n); and the
  share of weights clipped with V at the iteration's start and at its end (V moves within the iteration: the
  actor's weights lie between the two);
- the correlation of A with each logged weight's logarithm (what direction the weights point);
- the AWR target (the weighted mean above, as ranking weights) and its true value, beside the policy's;
- the critic's mean Q at the logged session starts for the behaviour's centre and the support ceiling (the best
  the logged region holds), beside their true values there.

    python benchmarks/offline_iql_advantage.py            # 2 settings × 8 iterations of 100 steps (about 4 min)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import init_local_ray, machine, misaligned_logs, write_results  # noqa: E402
from rllib_policies.offline.data import (  # noqa: E402
    MISALIGNED_WEIGHTS,
)
from rllib_policies.offline.experiment import OfflineSpec, build_learner  # noqa: E402
from rllib_policies.offline.shipped import EDGE, iql_temperature, to_unit, to_weights  # noqa: E402

CLIP = 100.0  # RLlib's IQL clips exp(β·A) here
RESULTS = os.path.join(ROOT, "benchmarks", "results", "offline_iql_advantage.md")


@torch.no_grad()
def q_min(module, heads, obs: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """min of the twin critics ``heads`` = (encoder, head, twin encoder, twin head) at (obs, unit actions)."""
    batch = {"obs": obs, "actions": unit}
    first = module._qf_forward_train_helper(batch, encoder=heads[0], head=heads[1])
    return torch.minimum(first, module._qf_forward_train_helper(batch, encoder=heads[2], head=heads[3]))


def weights(temperature: float, advantage) -> np.ndarray:
    """IQL's actor weights, min(exp(β·A), ``CLIP``)."""
    a = np.asarray(advantage, np.float64)
    return np.minimum(np.exp(np.minimum(temperature * a, 50.0)), CLIP)


def target_heads(module) -> tuple:
    """The twin target critics as (encoder, head, twin encoder, twin head)."""
    return module.target_qf_encoder, module.target_qf, module.target_qf_twin_encoder, module.target_qf_twin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--updates", type=int, default=100, help="gradient steps per iteration")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()

    init_local_ray(num_cpus=2)
    t_start = time.time()
    spec = OfflineSpec(iterations=args.iterations, updates_per_iteration=args.updates)
    logs = misaligned_logs(spec, "iql-advantage-")
    path, rows, value, ceiling = logs.path, logs.rows, logs.value, logs.ceiling
    initial = rows["obs"][rows["t"] == 0]
    starts = torch.as_tensor(np.array(initial))
    obs = torch.as_tensor(np.array(rows["obs"]))
    unit = torch.as_tensor(to_unit(rows["actions"]))
    log_w = np.log(rows["actions"])
    pre_tanh = np.arctanh(np.clip(to_unit(rows["actions"]), -1 + EDGE, 1 - EDGE))
    references = {"behaviour's centre": MISALIGNED_WEIGHTS, "support ceiling": ceiling.weights}
    beta = iql_temperature(path)
    settings = {
        f"the paper's β on its reward scale ({beta:.1f})": {},
        f"β × 3.33 ({beta * 10 / 3:.1f})": {"beta": beta * 10 / 3},
    }
    lines = [
        "| setting | steps | A mean | A std | ESS / n | clipped at the iteration's start → end | "
        "corr(A, log w) click, long view, purchase | AWR target (weights) | its true V | policy's mean weights | "
        "policy's true V | Q at the centre | Q at the ceiling |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|",
    ]
    for setting, options in settings.items():
        learner = build_learner("iql", path, seed=0, spec=replace(spec, options={"iql": options}))
        temperature = learner.algo.config.beta
        try:
            for i in range(1, args.iterations + 1):
                before = copy.deepcopy(target_heads(learner.module))  # the targets A used during this iteration
                with torch.no_grad():
                    q_logged = q_min(learner.module, before, obs, unit)
                    start_weights = weights(temperature, q_logged - learner.module.compute_values({"obs": obs}))
                learner.train()
                module = learner.module
                with torch.no_grad():
                    advantage = (q_logged - module.compute_values({"obs": obs})).numpy()
                    q_at = {  # at the logged session starts, where the true V above is measured
                        name: float(
                            q_min(
                                module,
                                target_heads(module),
                                starts,
                                torch.as_tensor(to_unit(np.asarray(w, np.float32)[None])).expand(len(starts), -1),
                            ).mean()
                        )
                        for name, w in references.items()
                    }
                w = weights(temperature, advantage)
                target = to_weights(np.tanh((w[:, None] * pre_tanh).sum(0) / w.sum())[None])[0]
                corr = [np.corrcoef(advantage, log_w[:, k])[0, 1] for k in range(log_w.shape[1])]
                policy = learner.policy_weights(initial).mean(0)
                q_centre, q_ceiling = q_at["behaviour's centre"], q_at["support ceiling"]
                row = (
                    f"| {setting} | {i * args.updates} | {advantage.mean():.2f} | {advantage.std():.2f} | "
                    f"{w.sum() ** 2 / (w**2).sum() / len(w):.0%} | "
                    f"{np.mean(start_weights >= CLIP):.0%} → {np.mean(w >= CLIP):.0%} | "
                    f"{', '.join(f'{c:+.2f}' for c in corr)} | ({', '.join(f'{x:.3f}' for x in target)}) | "
                    f"{value(target):.2f} | ({', '.join(f'{x:.3f}' for x in policy)}) | "
                    f"{value(learner.policy_weights):.2f} | {q_centre:.2f} | {q_ceiling:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
        finally:
            learner.stop()
    wall = time.time() - t_start
    command = f"python benchmarks/offline_iql_advantage.py --iterations {args.iterations} --updates {args.updates}"
    sections = [
        "# RLlib's IQL on the misaligned logs: where its advantage weights point",
        "",
        f"Machine: {machine()}. Command: `{command}` — {wall:.0f} s wall. Seed 0, the offline benchmark's world, "
        f"logs ({len(np.unique(rows['eps_id']))} sessions, {len(rows['rewards'])} transitions) and budget.",
        "",
        f"True V on {spec.eval_sessions} sessions: the behaviour's centre "
        f"({', '.join(f'{x:g}' for x in MISALIGNED_WEIGHTS)}, without its jitter) "
        f"{value(MISALIGNED_WEIGHTS):.2f}; the support ceiling ({', '.join(f'{x:.3f}' for x in ceiling.weights)}) "
        f"{ceiling.value.mean():.2f}. A = min of the twin target critics from before the iteration (the ones the "
        "actor's weights used during it) minus V at its end, over every logged transition (clipped shares also "
        "with V at its start: V moves within an iteration, and the weights the actor saw lie between); weights "
        f"min(exp(β·A), {CLIP:g}); ESS / n = (Σw)² / (n·Σw²). AWR target = the weighted mean of the logged actions "
        "in the policy's pre-tanh coordinates, mapped to ranking weights: what a state-independent Gaussian fitted "
        "by the actor's loss converges to, with the end-of-iteration weights. Q = the min of the twin target critics "
        "at that action, mean over the logged session starts (where the true values above are measured).",
        "",
        *lines,
        "",
    ]
    write_results(args.results, sections, partial=False)


if __name__ == "__main__":
    main()
