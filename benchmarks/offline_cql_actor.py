"""Why RLlib's CQL picks the worse of two logged rankings (issue 13): its critic against its actor, per iteration.

The CI-sized learning test's logs (`tests/rllib_policies/test_offline_rl.py`): a tiny world, each user served one
of two rankings by a coin the state does not show — near the long-views corner (0.05, 1, 0.05) or near the default
(1, 1, 10), jittered by exp(0.05·ε). CQL fails that test. Each iteration this prints, averaged over logged states:

- Q at each mode's action (the critic's ranking of the two) and at the box's centre;
- E Q under the actor's own spread at each mode: the actor's tanh-Gaussian, its mean moved to the mode and its
  standard deviations kept, 16 samples per state (what SAC's actor loss, E_a~π[Q(s, a)] − α log π, sees there);
- the policy's mean weights, its true value on the tiny world, its entropy weight α.

    python benchmarks/offline_cql_actor.py                 # 6 settings × 3 iterations of 200 steps (about 5 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from benchmarks.common import init_local_ray, machine, write_results  # noqa: E402
from rllib_policies.offline.data import (  # noqa: E402
    eval_users,
    read_rows,
    support_fraction,
    true_value,
    two_mode_behaviour,
    write_dataset,
)
from rllib_policies.offline.experiment import OfflineSpec, build_learner  # noqa: E402
from rllib_policies.offline.shipped import EDGE, to_unit  # noqa: E402

TINY = {"world": {"n_items": 1500, "n_users": 300}, "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 6}}
WORSE, BETTER = "worse (0.05, 1, 0.05)", "better (1, 1, 10)"
MODES = {WORSE: np.array([0.05, 1.0, 0.05], np.float32), BETTER: np.array([1.0, 1.0, 10.0], np.float32)}
# what a learner that did not learn would serve: an untrained network's box centre, and the modes' average (BC's)
REFERENCES = {
    "the box's centre (1, 1, 20)": [1.0, 1.0, 20.0],
    "the modes' average (0.525, 1, 5.025)": [0.525, 1.0, 5.025],
}
NARROW = {"actor_lr": 1e-3, "initial_alpha": 0.1, "target_entropy": -12.0}
SETTINGS = {  # name → CQL options (shipped_config keywords)
    "RLlib's defaults": {},
    "actor lr 1e-3": {"actor_lr": 1e-3},
    "actor lr 1e-3, α₀ 0.1, target entropy −12": NARROW,
    "the log box": {"action_scale": "log"},
}
CLONING_STARTS = {  # the actor clones the logs for its first iteration, then runs SAC's loss (``clone_logs``)
    "a behaviour-cloning start (its first iteration), then SAC's actor": {},
    "the same start with the narrower actor (actor lr 1e-3, α₀ 0.1, target entropy −12)": NARROW,
}
SETTINGS.update(CLONING_STARTS)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "offline_cql_actor.md")


def two_mode_rows(folder: str) -> str:
    """The learning test's logs, written once into ``folder`` (the same rows as its fixture)."""
    behaviour = two_mode_behaviour(*MODES.values())
    return write_dataset("two_mode", TINY, folder, days=2, users_per_day=150, sample=behaviour)["path"]


@torch.no_grad()
def probe(learner, obs: torch.Tensor, samples: int = 16) -> dict:
    """Q at each mode's action (and at the box's centre), and E Q under the actor's spread with its mean moved to
    the mode. Its samples come from a forked generator: the training it measures draws from torch's own."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return _probe(learner, obs, samples)


def _probe(learner, obs: torch.Tensor, samples: int) -> dict:
    module = learner.module
    log_std = module.forward_inference({"obs": obs})["action_dist_inputs"].chunk(2, dim=-1)[1]
    out = {}
    for name, weights in MODES.items():
        unit = torch.as_tensor(to_unit(weights[None], learner.action_scale), dtype=torch.float32).expand(len(obs), -1)
        at_mode = module.compute_q_values({"obs": obs, "actions": unit})
        pre_tanh = torch.atanh(unit.clamp(-1 + EDGE, 1 - EDGE))
        spread = [
            module.compute_q_values(
                {"obs": obs, "actions": torch.tanh(pre_tanh + log_std.exp() * torch.randn_like(pre_tanh))}
            )
            for _ in range(samples)
        ]
        out[name] = (float(at_mode.mean()), float(torch.stack(spread).mean()))
    centre = torch.zeros(len(obs), len(MODES[WORSE]))  # u = 0: (1, 1, 20) in the linear box, its ranking in the log box
    out["centre"] = float(module.compute_q_values({"obs": obs, "actions": centre}).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--updates", type=int, default=200, help="gradient steps per iteration")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()

    torch.manual_seed(0)
    init_local_ray(num_cpus=2)
    t_start = time.time()
    folder = tempfile.mkdtemp(prefix="cql-actor-")
    path = two_mode_rows(folder)
    rows = read_rows(path)
    initial = rows["obs"][rows["t"] == 0]
    obs = torch.as_tensor(rows["obs"][:500])
    _, pipeline = build_world(TINY)
    users = eval_users(pipeline, 300)
    values = {name: float(true_value(pipeline, w, users).mean()) for name, w in MODES.items()}
    others = {
        name: float(true_value(pipeline, np.array(w, np.float32), users).mean()) for name, w in REFERENCES.items()
    }
    start = float(np.mean(list(values.values())))  # the learning test's start: half the users in each mode
    lines = [
        "| setting | steps | Q at the worse mode | Q at the better mode | Q at the unit box's centre | "
        "E Q, actor's spread at the worse | E Q, actor's spread at the better | policy's mean weights | true V | "
        "support | α |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for setting, options in SETTINGS.items():
        spec = OfflineSpec(
            env_config=TINY,
            updates_per_iteration=args.updates,
            batch_size=128,
            hidden=(64, 64),
            options={"cql": options},
        )
        learner = build_learner("cql", path, seed=0, spec=spec)
        try:
            for i in range(1, args.iterations + 1):
                if setting in CLONING_STARTS:
                    learner.clone_logs(on=i == 1)
                learner.train()
                q = probe(learner, obs)
                (worse_q, worse_spread), (better_q, better_spread) = q[WORSE], q[BETTER]
                weights = learner.policy_weights(initial)
                v = float(true_value(pipeline, learner.policy_weights, users).mean())
                alpha = float(learner.algo.learner_group._learner.curr_log_alpha["default_policy"].exp())
                row = (
                    f"| {setting} | {i * args.updates} | {worse_q:.2f} | {better_q:.2f} | {q['centre']:.2f} | "
                    f"{worse_spread:.2f} | "
                    f"{better_spread:.2f} | ({', '.join(f'{x:.2f}' for x in weights.mean(0))}) | {v:.2f} | "
                    f"{support_fraction(weights, rows['actions']):.0%} | {alpha:.3f} |"
                )
                lines.append(row)
                print(row, flush=True)
        finally:
            learner.stop()
    wall = time.time() - t_start
    command = "python benchmarks/offline_cql_actor.py" + "".join(
        f" --{k} {v}" for k, v in (("iterations", args.iterations), ("updates", args.updates))
    )
    sections = [
        "# RLlib's CQL on two logged rankings: its critic against its actor",
        "",
        f"Machine: {machine()}. Command: `{command}` — {wall:.0f} s wall. Seed 0, batch 128, hidden (64, 64).",
        "",
        f"Logs: {len(np.unique(rows['eps_id']))} sessions of a tiny world (1 500 items, 300 users), each user "
        "served one of two rankings by a coin the state does not show, jittered by exp(0.05·ε). True V on 300 "
        "users: "
        + ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        + f", their mean (the learning test's start) {start:.2f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in others.items())
        + ". Q = the min of the twin critics at the "
        "mode's unit action, mean over 500 logged states; E Q under the actor's spread = the same with the "
        "actor's tanh-Gaussian centred at the mode (its standard deviations kept, 16 samples a state): what "
        "SAC's actor loss sees if its mean sat there. Support = the share of the policy's actions at the "
        "logged session starts within 0.1 of a logged action.",
        "",
        *lines,
        "",
    ]
    write_results(args.results, sections, partial=False)


if __name__ == "__main__":
    main()
