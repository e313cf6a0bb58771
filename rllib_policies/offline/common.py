"""What the offline actor-critics (TD3, BCQ, UWAC) share: the config's options, the twin critics, the
algorithm that reads a logged dataset (on the driver, with pyarrow) and trains on minibatches of it.

Actions are handled in the box's unit cube: ā = a / a_max ∈ [0, 1]³ (a_max = ``RANKING_ACTION_HIGH``); the
critics see (s, ā), the policies output ā and serve a = a_max·ā.

One iteration = ``updates_per_iteration`` gradient steps: that many minibatches of ``batch_size`` transitions
drawn uniformly (with replacement) from the dataset, handed to the learners in one ``update_learners`` call
(RLlib splits it into the minibatches). ``results["offline"]`` reports the critic's estimate of its own policy's
value, mean_s0 Q¹(s0, π(s0)) over the dataset's session starts — what the overestimation plot puts beside the
policy's true value.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import make_target_network, update_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.algorithm_base import AlgorithmBase, AlgorithmConfigBase, set_provided
from rllib_policies.building_blocks import mlp

from .data import read_rows


class OfflineConfig(AlgorithmConfigBase):
    """The shared options of the offline actor-critics (``.offline_rl(...)``)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.dataset = None
        self.updates_per_iteration = 250
        self.batch_size = 256
        self.tau = 0.02
        self.actor_lr = 3e-4
        self.lr = 3e-4
        self.gamma = 1.0
        self.hidden = (128, 128)
        self.num_env_runners = 0

    def offline_rl(
        self,
        *,
        dataset: str | list[str] = NotProvided,
        updates_per_iteration: int = NotProvided,
        batch_size: int = NotProvided,
        tau: float = NotProvided,
        actor_lr: float = NotProvided,
        hidden: tuple[int, ...] = NotProvided,
    ) -> OfflineConfig:
        """Sets the options every offline actor-critic shares.

        Args:
            dataset: Transition Parquet path(s) (``rllib_policies.offline.data.write_dataset``); required.
            updates_per_iteration: Gradient steps per ``train()`` call.
            batch_size: Transitions per gradient step.
            tau: Polyak rate of the target networks (θ' ← τ·θ + (1 − τ)·θ' after every step).
            actor_lr: The actor's learning rate (the critics use ``lr``).
            hidden: Hidden widths of every network.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        if self.dataset is None:
            raise ValueError("offline_rl(dataset=…) is required: the logged transitions to learn from")
        if self.env is None:
            raise ValueError("offline learners need .environment(SessionEnv, env_config=…) for their spaces")
        for name in ("updates_per_iteration", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")


class TwinCritic(nn.Module):
    """Q¹(s, ā), Q²(s, ā): two independent MLPs (TD3's clipped double-Q)."""

    def __init__(self, d_obs: int, d_act: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1, self.q2 = mlp(d_obs + d_act, hidden, 1), mlp(d_obs + d_act, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class OfflineActorCriticModule(TorchRLModule, TargetNetworkAPI, InferenceOnlyAPI):
    """The shared half of the modules: ``high`` (a_max), the twin critics and their targets; subclasses add
    the actor (``setup_actor``) and ``act_unit(obs) → ā`` (the deterministic policy in the unit cube)."""

    target_attributes: ClassVar[tuple[str, ...]] = ("actor",)

    def setup(self):
        cfg = {"hidden": (128, 128), **(self.model_config or {})}
        self.register_buffer("high", torch.as_tensor(np.asarray(self.action_space.high, np.float32)))
        d_obs, d_act = self.observation_space.shape[0], len(self.high)
        self.critic = self.make_critic(d_obs, d_act, tuple(cfg["hidden"]))
        self.setup_actor(d_obs, d_act, tuple(cfg["hidden"]))

    def make_critic(self, d_obs: int, d_act: int, hidden: tuple[int, ...]) -> nn.Module:
        return TwinCritic(d_obs, d_act, hidden)

    def setup_actor(self, d_obs: int, d_act: int, hidden: tuple[int, ...]) -> None:
        raise NotImplementedError

    def act_unit(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, batch, **kwargs):
        return {Columns.ACTIONS: self.high * self.act_unit(batch[Columns.OBS])}

    # ---------------------------------------------------------------- TargetNetworkAPI
    def make_target_networks(self) -> None:
        self.target_critic = make_target_network(self.critic)
        for name in self.target_attributes:
            setattr(self, f"target_{name}", make_target_network(getattr(self, name)))

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.critic, self.target_critic)]
        return pairs + [(getattr(self, n), getattr(self, f"target_{n}")) for n in self.target_attributes]

    def forward_target(self, batch: dict) -> dict:
        return {Columns.ACTIONS: self.act_unit(batch[Columns.OBS], target=True)}

    # ---------------------------------------------------------------- InferenceOnlyAPI
    def get_non_inference_attributes(self) -> list[str]:
        return ["target_critic"] + [f"target_{n}" for n in self.target_attributes]


class OfflineLearner(TorchLearner):
    """The learners' shared mechanics: one Adam per network (``optimizers``), target networks made at build
    and Polyak-averaged after every gradient step (θ' ← τ·θ + (1 − τ)·θ', RLlib's ``update_target_network``;
    ``after_gradient_based_update`` runs once per ``update`` call, i.e. once per iteration here); a network
    whose loss term was skipped on a step (TD3's policy delay) gets no gradient, and its optimizer skips it."""

    def optimizers(self, module, config) -> list[tuple[str, nn.Module, float]]:
        """(name, network, learning rate) of every optimizer of ``module``."""
        raise NotImplementedError

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        for name, net, lr in self.optimizers(self._module[module_id], config):
            params = self.get_parameters(net)
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def build(self) -> None:
        super().build()
        for module in self.module.values():
            module.unwrapped().make_target_networks()
        self.steps = 0

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        """RLlib's learner state and the gradient steps taken (``steps``: TD3's ``bc_steps`` and policy delay count
        them), so a restored run goes on where it stopped."""
        return {**super().get_state(components, not_components=not_components, **kwargs), "steps": self.steps}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.steps = int(state.get("steps", self.steps))

    def compute_gradients(self, loss_per_module, **kwargs):
        return {pid: g for pid, g in super().compute_gradients(loss_per_module, **kwargs).items() if g is not None}

    def apply_gradients(self, gradients_dict) -> None:
        super().apply_gradients(gradients_dict)
        self.steps += 1
        for module in self.module.values():
            for main, target in module.unwrapped().get_target_network_pairs():
                update_target_network(main_net=main, target_net=target, tau=self.config.tau)


def is_int(value) -> bool:
    """An int and not a bool: to Python True is the int 1, to a step or row-set count it is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_window(window: int | None) -> int | None:
    """``window`` (the row sets an -EE learner trains on) if it is None or a positive int, else a ValueError."""
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window must be None (every row set) or an int >= 1, got {window!r}")
    return window


class OfflineActorCritic(AlgorithmBase):
    """Reads the dataset once (``read_rows``: pyarrow on the driver), then trains on uniform minibatches of it."""

    metrics_key = "offline"

    def setup(self, config) -> None:
        super().setup(config)
        self.columns: dict[str, np.ndarray] | None = None
        self.row_sets: list[int] = []  # the sizes of the row sets in ``columns``, oldest first
        self.initial_obs: np.ndarray | None = None
        self.rng = np.random.default_rng(config.seed)
        self.updates = 0

    def load_rows(self) -> None:
        rows = read_rows(self.config.dataset)
        self.columns = self.transition_columns(rows)
        self.initial_obs = rows["obs"][rows["t"] == 0]
        self.row_sets = [len(self.columns[Columns.REWARDS])]

    def add_rows(self, path: str | list[str], window: int | None = None) -> int:
        """Grows the dataset by the transitions at ``path`` (e.g. an online exploration round's logs); the critic's
        estimate stays measured at the first dataset's session starts. ``window``: train on the last ``window``
        row sets only (the logs are the first set, each call adds one); None keeps them all. Returns the dataset's
        new size. The added rows are not checkpointed: a restored algorithm reads its config's dataset only."""
        check_window(window)
        if self.columns is None:
            self.load_rows()
        extra = self.transition_columns(read_rows(path))
        sets = [*self.row_sets, len(extra[Columns.REWARDS])]
        keep = sets if window is None else sets[-window:]
        drop = sum(sets) - sum(keep)
        self.columns = {k: np.concatenate([v, extra[k]])[drop:] for k, v in self.columns.items()}
        self.row_sets = keep
        return len(self.columns[Columns.REWARDS])

    def transition_columns(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows (``read_rows``) → the learners' columns, actions in the unit cube."""
        module = self.inference_module()
        d, high = module.observation_space.shape[0], module.high.numpy()
        if rows["obs"].ndim != 2 or rows["obs"].shape[1] != d:
            raise ValueError(f"dataset obs have shape {rows['obs'].shape}; the env's observation has dimension {d}")
        return {
            Columns.OBS: rows["obs"],
            Columns.ACTIONS: np.clip(rows["actions"] / high, 0.0, 1.0).astype(np.float32),
            Columns.REWARDS: rows["rewards"].astype(np.float32),
            Columns.NEXT_OBS: rows["new_obs"],
            Columns.TERMINATEDS: rows["terminateds"].astype(np.float32),
        }

    def training_step(self) -> None:
        if self.columns is None:
            self.load_rows()
        cfg = self.config
        idx = self.rng.integers(0, len(self.columns[Columns.REWARDS]), cfg.updates_per_iteration * cfg.batch_size)
        self.update_learners(
            {k: v[idx] for k, v in self.columns.items()},
            minibatch_size=cfg.batch_size,
            num_epochs=1,
            shuffle_batch_per_epoch=False,
        )
        self.updates += cfg.updates_per_iteration
        self.metrics.log_dict(
            {"q_estimate": self.q_estimate(), "updates": self.updates}, key=self.metrics_key, window=1
        )

    # ---------------------------------------------------------------- the policy on the driver
    def policy_weights(self, obs: np.ndarray, module=None) -> np.ndarray:
        """The deterministic policy's ranking weights [B, 3] for observations [B, d]."""
        module = module or self.inference_module()
        with torch.no_grad():
            return (module.high * module.act_unit(torch.as_tensor(obs, dtype=torch.float32))).numpy()

    def q_estimate(self, initial_obs: np.ndarray | None = None) -> float:
        """The critic's estimate of its own policy's value: mean over session starts (default: the dataset's)
        of Q¹(s0, π(s0))."""
        module = self.inference_module()
        with torch.no_grad():
            obs = torch.as_tensor(self.initial_obs if initial_obs is None else initial_obs, dtype=torch.float32)
            return float(module.critic(obs, module.act_unit(obs))[0].mean())

    def own_state(self) -> dict:
        return {"updates": self.updates}

    def set_own_state(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
