"""Write the worked example of docs/ope.md ("Evaluating candidate policies on logs"): two logged-bandit
Parquet files with known policy values, their policies files, and the true values.

    python scripts/make_ope_example.py /tmp/ope_example

- ``grid_logs.parquet``: :class:`GridBandit` (5 actions, contexts x0..x2, 4 rows per user), columns
  x0, x1, x2, action, reward, propensity, user. Context-free grid policies have the exact value
  V(π) = Σ_a π(a)·b_a (E[x] = 0 in μ(x, a) = x·θ_a + b_a).
- ``weight_logs.parquet``: :class:`WeightBandit` (2 weights, a = log w, truncated-Gaussian logging on
  [−2, 2]²), columns x0, x1, weights (w = exp a, a list column), density (of a = log w), reward, user.
  Context-free weight policies' values by Monte Carlo (2·10⁵ draws, s.e. < 10⁻³).
- ``grid_policies.yaml``, ``weight_policies.yaml``, ``truth.json``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rllib_policies.ope import GaussianPolicy
from rllib_policies.ope.synthetic import GridBandit, WeightBandit

MC = 200_000
BOX = 2.0  # WeightBandit's box on a = log w

GRID_POLICIES = [
    {"name": "uniform", "kind": "grid", "probabilities": [0.2] * 5},
    {"name": "mostly_4", "kind": "grid", "probabilities": [0.05, 0.05, 0.05, 0.05, 0.8]},
    {"name": "always_4", "kind": "grid", "action": 4},
]
WEIGHT_POLICIES = [
    {
        "name": "near",
        "kind": "gaussian",
        "mean": [1.0, 1.0],
        "std": 0.5,
        "low": float(np.exp(-BOX)),
        "high": float(np.exp(BOX)),
    },
    {
        "name": "far",
        "kind": "gaussian",
        "mean": [6.0, 6.0],
        "std": 0.5,
        "low": float(np.exp(-BOX)),
        "high": float(np.exp(BOX)),
    },
    {"name": "fixed", "kind": "deterministic", "weights": [1.0, 1.0], "bandwidth": 0.3},
]


def grid_logs(n: int, seed: int) -> tuple[pa.Table, dict[str, float]]:
    bandit = GridBandit()
    data = bandit.logs(n, np.random.default_rng(seed), rows_per_user=4)
    table = pa.table(
        {
            **{f"x{j}": data.context[:, j] for j in range(data.context.shape[1])},
            "action": data.action,
            "reward": data.reward[:, 0],
            "propensity": data.propensity,
            "user": data.clusters,
        }
    )
    bias = bandit.theta[1]
    truth = {}
    for p in GRID_POLICIES:
        pi = np.eye(bandit.n_actions)[p["action"]] if "action" in p else np.asarray(p["probabilities"])
        truth[p["name"]] = float(pi @ bias)
    return table, truth


def weight_logs(n: int, seed: int) -> tuple[pa.Table, dict[str, float]]:
    bandit = WeightBandit()
    data = bandit.logs(n, np.random.default_rng(seed), rows_per_user=4)
    weights = np.exp(data.action)
    table = pa.table(
        {
            **{f"x{j}": data.context[:, j] for j in range(data.context.shape[1])},
            "weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.ravel()), weights.shape[1]),
            "density": data.propensity,
            "reward": data.reward[:, 0],
            "user": data.clusters,
        }
    )
    rng = np.random.default_rng(12345)
    x = rng.standard_normal((MC, bandit.dim))
    truth = {}
    for p in WEIGHT_POLICIES:
        if p["kind"] == "gaussian":
            a = GaussianPolicy(np.log(p["mean"]), np.full(2, p["std"]), -BOX, BOX).sample(rng, MC)
        else:
            a = np.broadcast_to(np.log(p["weights"]), (MC, 2))
        truth[p["name"]] = float(bandit.mean_reward(x, a).mean())
    return table, truth


def main(out: str, n: int = 4000, seed: int = 0) -> dict:
    os.makedirs(out, exist_ok=True)
    grid, grid_truth = grid_logs(n, seed)
    weights, weight_truth = weight_logs(n, seed)
    pq.write_table(grid, os.path.join(out, "grid_logs.parquet"))
    pq.write_table(weights, os.path.join(out, "weight_logs.parquet"))
    for name, policies in (("grid_policies.yaml", GRID_POLICIES), ("weight_policies.yaml", WEIGHT_POLICIES)):
        with open(os.path.join(out, name), "w") as f:
            yaml.safe_dump({"policies": policies}, f, sort_keys=False, default_flow_style=None)
    truth = {"grid": grid_truth, "weights": weight_truth}
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    return truth


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "ope_example"), indent=1))
