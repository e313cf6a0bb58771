"""The utility-weight agent in the request path: picks the ranking utility weights per request.

Placement (``utility_agent.placement``):
  replica     (the default on the fused path) ``UtilityAgent`` runs inside the recommend replica: one small
              forward pass per request, no hop
  deployment  ``UtilityAgentDeployment``, scaled on its own: the ingress calls ``choose`` at the start of a
              request, in parallel with matching and pre-ranking, and awaits it (bounded by ``timeout_s``)
              only before ranking; calls are batched across concurrent requests (``serve.batch``)

Modes (``utility_agent.mode`` in the recommend app's args):
  agent    the deployed policy at λ (UtilityQModule.act): π_λ(s) = argmax_a λ·Q̃₁(s, a) + (1 − λ)·Q̃₂(s, a)
           with the trained agent (agent.pt), or — where do no harm fell back at that λ (the nearest
           swept one) — the best global vector g_λ for every request
  explore  the logging policy: a uniformly random grid action per request, propensity 1/|A|

The live operating point — λ, or a fixed global weight vector — lives in a VersionedParamStore:
``PUT /operating-point`` on the ingress bumps its version and returns once every agent replica
holds it, so all replicas switch together without a redeploy.

``agent.path`` is where the training job kept agent.pt: a path relative to the storage root ($MORL_STORAGE,
else ~/morl-runs), an absolute path, or a URI (``s3://…``, fetched to its local mirror; rllib_policies.storage).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray import serve

from actors.observation import ObservationSpec
from actors.param_store import ParamFollower
from actors.served_policies import operating_point_store
from actors.stages import RequestBatch, StageContext
from actors.world import PipelineConfig, World, WorldConfig
from rllib_policies import storage
from rllib_policies.utility_agent.exploration import ActionGrid
from rllib_policies.utility_agent.module import load_agent


class UtilityAgent:
    """The agent's decisions for request batches (a plain class: in the recommend replica, or in its own
    deployment below), following the live operating point from its versioned store as ``reader_id``."""

    def __init__(
        self,
        world_config: WorldConfig,
        pipeline_config: PipelineConfig,
        agent: dict,
        store_prefix: str,
        reader_id: str,
        ctx: StageContext | None = None,
    ):
        torch.set_num_threads(1)  # one small forward pass per batch: extra threads only contend with the stages
        self.mode = agent.get("mode", "agent")
        # the requests' context needs only the serving system's view: the recommend replica's own, when given
        self.ctx = ctx or StageContext(World(world_config), pipeline_config.seed)
        self.spec = ObservationSpec.of(world_config)
        if self.mode == "agent":
            self.module = load_agent(storage.local_copy(storage.resolve(agent["path"])))
            self.weights = self.module.grid.numpy()
        else:
            self.module = None
            self.weights = ActionGrid(int(agent.get("grid_n", 7)), tuple(agent.get("grid_high", (2.0, 40.0)))).weights
        self.rng = np.random.default_rng()
        self.replica = reader_id
        store = operating_point_store(store_prefix, agent.get("lambda", 0.5))
        self.follower = ParamFollower(store, f"utility-agent-{reader_id}", dict)

    def choose(self, requests: list[RequestBatch]) -> list[dict]:
        """Per request: {"weights", "action", "propensity", "lambda", "operating_point_version", "mode", "context"}."""
        obs = self.spec.context(self.ctx, RequestBatch.concat(requests))  # step, clicks clipped to the trained range
        version, op = self.follower.current
        lam = op.get("lambda")
        if self.mode == "explore":
            actions = self.rng.integers(0, len(self.weights), len(obs))
            weights, propensity = self.weights[actions], np.full(len(obs), 1.0 / len(self.weights))
        elif op.get("weights") is not None:  # a fixed global operating point
            actions = np.full(len(obs), -1)
            weights, propensity = (
                np.broadcast_to(np.asarray(op["weights"], np.float32), (len(obs), 3)),
                np.ones(len(obs)),
            )
        else:
            with torch.no_grad():  # π_λ, or g_λ where do no harm fell back
                actions = self.module.act(torch.as_tensor(obs), float(lam)).numpy()
            weights, propensity = self.weights[actions], np.ones(len(obs))
        return [
            {
                "weights": weights[i],
                "action": int(actions[i]),
                "propensity": float(propensity[i]),
                "lambda": None if op.get("weights") is not None else lam,
                "operating_point_version": version,
                "mode": self.mode,
                "context": obs[i],
            }
            for i in range(len(obs))
        ]

    def replica_state(self) -> dict[str, Any]:
        version, op = self.follower.current
        return {"replica": self.replica, "operating_point_version": version, "operating_point": op, "mode": self.mode}


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
class UtilityAgentDeployment:
    """The agent in its own deployment (``placement: deployment``), batching concurrent requests."""

    def __init__(self, world_config: WorldConfig, pipeline_config: PipelineConfig, agent: dict, store_prefix: str):
        replica = serve.get_replica_context().replica_id.unique_id
        self.agent = UtilityAgent(world_config, pipeline_config, agent, store_prefix, replica)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def choose(self, requests: list[RequestBatch]) -> list[dict]:
        return self.agent.choose(requests)

    def replica_state(self) -> dict[str, Any]:
        return self.agent.replica_state()
