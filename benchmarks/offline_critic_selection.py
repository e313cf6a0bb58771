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
    python benchmarks/offline_critic_selection.py --learners cql --options '{"cql": {"min_q_weight": 5}}' \
        '{"cql": {"min_q_weight": 0.2}}' --tag cql_alpha       # one row set per options, side by side

Each served policy's support (the share of its actions at the logged session starts within 0.1, unit-cube
max-norm, of a logged action) is reported beside its value: a gain from leaving the logs is not an in-support one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.stages import RANKING_ACTION_HIGH  # noqa: E402
from benchmarks.common import init_local_ray, machine, misaligned_logs, write_results  # noqa: E402
from rllib_policies.offline.data import MISALIGNED_WEIGHTS, support_fraction  # noqa: E402
from rllib_policies.offline.experiment import OfflineSpec, build_learner, check_options  # noqa: E402
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


def _options(text: str) -> dict:
    try:
        options = json.loads(text)
        if not isinstance(options, dict):
            raise ValueError("not a learner → options mapping")
        check_options(options)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e
    return options


def _weights(w: np.ndarray) -> str:
    return f"({', '.join(f'{x:.3f}' for x in w)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--candidates", type=int, nargs="+", default=[16, 256], help="K logged actions to pick among")
    p.add_argument(
        "--samples", type=int, nargs="*", default=[64], help="N of its policy's samples to pick among (CQL, IQL)"
    )
    p.add_argument(
        "--options",
        type=_options,
        nargs="+",
        default=[{}],
        help='one or more learner → options mappings (JSON), each a row set, e.g. \'{"cql": {"min_q_weight": 1}}\'; '
        "with several, each trains only the learners it names",
    )
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--updates", type=int, default=100, help="gradient steps per iteration")
    p.add_argument("--tag", default=None, help="write offline_critic_selection_<tag>.md instead")
    p.add_argument("--results", default=None, help="the page to write (default: from --tag)")
    args = p.parse_args()
    results = args.results or (RESULTS.replace(".md", f"_{args.tag}.md") if args.tag else RESULTS)

    init_local_ray(num_cpus=2)
    t_start = time.time()
    logs = misaligned_logs(OfflineSpec(), "critic-selection-")
    path, rows, value, ceiling = logs.path, logs.rows, logs.value, logs.ceiling
    behaviour = value(MISALIGNED_WEIGHTS)
    starts = rows["obs"][rows["t"] == 0]

    def served(policy) -> list[str]:
        """V, support and mean weights at the logged session starts of ``policy``."""
        picked = policy(starts)
        return [f"{value(policy):.2f}", f"{support_fraction(picked, rows['actions']):.0%}", _weights(picked.mean(0))]

    columns = ["its own policy (CQL, IQL: its mean)"]
    columns += [f"critic's pick among {k} logged" for k in args.candidates]
    columns += [f"pick among its mean and {n} samples" for n in args.samples]
    lines = [
        "| learner | options | seed | "
        + " | ".join(f"{c}: V | support | mean weights" for c in columns)
        + " | train s |",
        "|---|---|---:|" + "---:|---:|---|" * len(columns) + "---:|",
    ]
    for options in args.options:
        spec = OfflineSpec(iterations=args.iterations, updates_per_iteration=args.updates, options=options)
        for name in args.learners:
            if len(args.options) > 1 and name not in options:  # trained at its defaults once would be enough
                continue
            label = json.dumps(options[name]) if options.get(name) else "defaults"
            for seed in range(args.seeds):
                learner = build_learner(name, path, seed=seed, spec=spec)
                try:
                    t0 = time.time()
                    for _ in range(args.iterations):
                        learner.train()
                    train_s = time.time() - t0
                    if name in SHIPPED:
                        learner.selection_samples = 0  # its policy's mean
                    cells = served(learner.policy_weights)
                    rng = np.random.default_rng(seed)
                    for k in args.candidates:
                        candidates = rows["actions"][rng.choice(len(rows["actions"]), k, replace=False)]
                        cells += served(selection(learner, name, np.asarray(candidates, np.float32)))
                    for n in args.samples:  # the served policy with ``selection_samples`` n (ShippedOffline._select)
                        if name not in SHIPPED:
                            cells += ["—", "—", "—"]
                            continue
                        learner.selection_samples = n
                        cells += served(learner.policy_weights)
                finally:
                    learner.stop()
                row = f"| {name} | {label} | {seed} | " + " | ".join(cells) + f" | {train_s:.0f} |"
                lines.append(row)
                print(row, flush=True)
    wall = time.time() - t_start
    command = (
        f"python benchmarks/offline_critic_selection.py --learners {' '.join(args.learners)} --seeds {args.seeds} "
        f"--candidates {' '.join(map(str, args.candidates))} --samples {' '.join(map(str, args.samples))} "
        f"--iterations {args.iterations} --updates {args.updates}"
        + (" --options " + " ".join(f"'{json.dumps(o)}'" for o in args.options) if args.options != [{}] else "")
        + (f" --tag {args.tag}" if args.tag else "")
        + (f" --results {args.results}" if args.results else "")
    )
    sections = [
        "# The offline critics on the misaligned logs: their own policy against their pick among logged actions",
        "",
        f"Machine: {machine()}. Command: `{command}` — {wall:.0f} s wall. The offline benchmark's world, logs "
        f"({len(np.unique(rows['eps_id']))} sessions, {len(rows['rewards'])} transitions) and budget.",
        "",
        f"True V on {OfflineSpec().eval_sessions} sessions, with the same random numbers for every policy: the "
        f"behaviour's centre (0.05, 1, 0.05) {behaviour:.2f}; the support ceiling {_weights(ceiling.weights)} "
        f"{ceiling.value.mean():.2f}. The critic's pick: in every state the candidate with the highest min-of-twins "
        "Q, the candidates K actions drawn once from the logs (per seed). The pick among its policy's samples (CQL "
        "and IQL; BCQ's policy already picks among its generator's): `selection_samples` N, in every state the "
        "highest Q among the policy's mean and N actions sampled from it that lie in the logs' support (the mean "
        "where none does), as `ShippedOffline` serves it. Support: the share of the served actions at the logged "
        "session starts within 0.1 (unit-cube max-norm, a / a_max) of a logged action; mean weights: their mean.",
        "",
        *lines,
        "",
    ]
    write_results(results, sections, partial=False)


if __name__ == "__main__":
    main()
