"""Learned policies the Serve apps follow from versioned stores, and their NumPy forward passes.

A trainer publishes a policy as one versioned ``put`` on its store (a ``VersionedParamStore``); every
replica's ``ParamFollower`` picks it up, the next response names the new version, and ``store.rollback``
restores the previous one (an empty publication, ``{}``, means "no learned policy: the held parameters").
Serving needs neither torch nor RLlib: the policies are small MLPs run in NumPy.

- **Stage policies** (UNEX-RL), one store per stage: a_k = high · sigmoid(MLP(o_k)), ReLU between layers.
- **The outer controller's ranking policy**, one store per app: the ranking utility weights per request,
  μ(s) = high ⊙ softmax([m(s), 0]) with m(s) = U·tanh(MLP(s)/U) (tanh between layers; no squash when
  U = ``max_logit`` is None), s = the request's context (``ObservationSpec.context``), exactly
  ``RankingPolicyModule.gaussian``'s mean.
- **The CRM weight policy** (Jeunen et al.), one store per app: the ranking weights w = exp(a) per request,
  a ~ N(m(x), diag std²) truncated to the log-weight box [low, high]³, with
  m(x) = low + (high − low)·sigmoid(W·(x − x̄)/s_x + b) (+ c(x)·1, c(x) = scale − mean_j m_j(x), clipped into
  the box, when the trainer aligned the scale), exactly ``CRM.deployed_policy`` for the certified candidate:
  std = σ_θ for π_θ itself, the jitter h for the learned mean. x = the request's context. Serving draws from it
  through ``serve_apps.weight_logging`` and logs the draw's density, so its traffic trains the next round.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ray
from scipy.special import softmax

from actors.param_store import get_or_create_store
from actors.stages import RANKING_PARAMS


def mlp_layers(mlp_state: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """An nn.Sequential state dict of Linear layers ("0.weight", "0.bias", "2.weight", …) as (W, b) pairs."""
    layers = sorted({int(k.split(".")[0]) for k in mlp_state})
    return [
        (np.asarray(mlp_state[f"{i}.weight"], np.float32), np.asarray(mlp_state[f"{i}.bias"], np.float32))
        for i in layers
    ]


def mlp_forward(
    layers: list[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    activation: Callable[[np.ndarray], np.ndarray] = lambda h: np.maximum(h, 0.0),
) -> np.ndarray:
    """h ← W h + b per layer, ``activation`` between layers (ReLU by default) [B, d_out]."""
    h = np.asarray(x, np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = activation(h)
    return h


def _state_lists(mlp_state: dict) -> dict[str, list]:
    return {k: np.asarray(v, np.float32).tolist() for k, v in mlp_state.items()}


# ------------------------------------------------------------------------------------ stage policies
def mlp_act(layers: list[tuple[np.ndarray, np.ndarray]], high: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """A stage policy's action a = high·sigmoid(MLP(o)) with ReLU between the Linear layers [B, n]."""
    return (np.asarray(high, np.float32) / (1.0 + np.exp(-mlp_forward(layers, obs)))).astype(np.float32)


def stage_policy_store(store_prefix: str, stage: str):
    """The versioned store a stage's Serve deployments follow for their learned policy ({}: none)."""
    return get_or_create_store(f"{store_prefix}_{stage}_policy", {})


def publish_stage_policy(store_prefix: str, stage: str, mlp_state: dict | None, high=None) -> dict:
    """Hot-update the stage policy every Serve replica of ``stage`` serves (None: back to the held
    parameters); returns the store's ack. ``mlp_state``: an nn.Sequential state dict (tensors or arrays)."""
    params = {}
    if mlp_state is not None:
        params = {"mlp_state": _state_lists(mlp_state), "high": np.asarray(high, np.float32).tolist()}
    return ray.get(stage_policy_store(store_prefix, stage).put.remote(params))


# ------------------------------------------------------------------- the outer controller's policy
class RankingPolicy:
    """The outer controller's deterministic ranking policy μ(s) = high ⊙ softmax([m(s), 0]) in NumPy."""

    def __init__(self, params: dict):
        """ValueError naming the problem when the layers do not chain into K − 1 logits or hold non-finite values."""
        self.layers = mlp_layers(params["mlp_state"])
        self.high = np.asarray(params["high"], np.float32)
        self.max_logit = None if params.get("max_logit") is None else float(params["max_logit"])
        d = self.layers[0][0].shape[1] if self.layers else 0
        for i, (w, b) in enumerate(self.layers):
            if w.ndim != 2 or w.shape[1] != d or b.shape != (w.shape[0],):
                raise ValueError(f"outer controller policy: layer {i} has shape {w.shape} / {b.shape} after width {d}")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ValueError(f"outer controller policy: layer {i} holds non-finite values")
            d = w.shape[0]
        if not self.layers or d != len(self.high) - 1:
            raise ValueError(f"outer controller policy: {d} outputs, expected K − 1 = {len(self.high) - 1} logits")
        self.context_dim = self.layers[0][0].shape[1]

    def __call__(self, context: np.ndarray) -> np.ndarray:
        """Ranking utility weights [B, K] for request contexts [B, context_dim] (ValueError on another width)."""
        if np.shape(context)[-1] != self.context_dim:
            raise ValueError(
                f"the policy reads {self.context_dim} context features, the request has {np.shape(context)[-1]}"
            )
        m = mlp_forward(self.layers, context, np.tanh)
        if self.max_logit is not None:
            m = self.max_logit * np.tanh(m / self.max_logit)
        x = softmax(np.concatenate([m, np.zeros_like(m[:, :1])], axis=1), axis=1)
        return (self.high * x).astype(np.float32)


def outer_controller_store(store_prefix: str):
    """The versioned store a recommend app follows for the outer controller's policy ({}: none published)."""
    return get_or_create_store(f"{store_prefix}_outer_controller_policy", {})


def publish_outer_controller(store_prefix: str, mlp_state: dict | None, high=None, max_logit=None) -> dict:
    """Hot-update the outer controller's policy every recommend replica of ``store_prefix`` serves (None:
    none); returns the store's ack. ``mlp_state``: m(s)'s nn.Sequential state dict (Linear layers, tanh
    between them); ``high`` [K]; ``max_logit``: U, or None."""
    params = {}
    if mlp_state is not None:
        params = {
            "mlp_state": _state_lists(mlp_state),
            "high": np.asarray(high, np.float32).tolist(),
            "max_logit": None if max_logit is None else float(max_logit),
        }
        RankingPolicy(params)  # a malformed policy is refused here, never published
    return ray.get(outer_controller_store(store_prefix).put.remote(params))


# ------------------------------------------------------------------------------ the CRM weight policy
CRM_VECTORS = ("bias", "low", "high", "std")  # [K] each, beside weight [K, d], obs_mean [d], obs_std [d]
CRM_FIELDS = ("weight", *CRM_VECTORS, "obs_mean", "obs_std", "scale", "deployed")


def _float_array(params: dict, name: str) -> np.ndarray:
    try:
        return np.asarray(params[name], np.float64)
    except KeyError:
        raise ValueError(f"CRM policy: missing field {name!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"CRM policy: {name} must be an array of numbers ({e})") from None


def log_box_floor(low: np.ndarray, high: np.ndarray) -> float:
    """The floor of a log-weight box [log(floor·w_max), log(w_max)] per weight: floor = exp(low − high), one value
    in (0, 1) for every weight, as Gaussian weight logging draws on; ValueError otherwise, giving the floors."""
    floors = np.exp(np.asarray(low, np.float64) - np.asarray(high, np.float64))
    if not (floors.size and np.allclose(floors, floors[0], rtol=1e-6, atol=0.0) and 0 < floors[0] < 1):
        raise ValueError(
            "low/high must be a log-weight box [log(floor·w_max), log(w_max)] with one floor in (0, 1) for every "
            f"weight, got floors {floors.tolist()}"
        )
    return float(floors[0])


class CRMPolicy:
    """The CRM weight policy's mean log-weights m(x) and log-space std, in NumPy (module docstring)."""

    def __init__(self, params: dict):
        """ValueError naming the field when a field is unknown or missing, a shape does not fit (K = the
        ranking weights), a value is not finite, a std or an observation scale is not > 0, or the box is not
        one serving draws on: [log(floor·w_max), log(w_max)] per weight with one floor in (0, 1)."""
        unknown = sorted(set(params) - set(CRM_FIELDS))
        if unknown:
            raise ValueError(f"CRM policy: unknown fields {unknown}; known are {list(CRM_FIELDS)}")
        self.weight = _float_array(params, "weight")
        vectors = {k: _float_array(params, k) for k in (*CRM_VECTORS, "obs_mean", "obs_std")}
        k = len(RANKING_PARAMS)
        if self.weight.ndim != 2 or self.weight.shape[0] != k:
            raise ValueError(f"CRM policy: weight has shape {self.weight.shape}, expected [{k}, context_dim]")
        d = self.weight.shape[1]
        for name, v in vectors.items():
            want = (d,) if name.startswith("obs_") else (k,)
            if v.shape != want:
                raise ValueError(f"CRM policy: {name} has shape {v.shape}, expected {want}")
        for name, v in {"weight": self.weight, **vectors}.items():
            if not np.isfinite(v).all():
                raise ValueError(f"CRM policy: {name} holds non-finite values")
        for name in ("std", "obs_std"):
            if (vectors[name] <= 0).any():
                raise ValueError(f"CRM policy: {name} must be > 0, got {vectors[name].tolist()}")
        try:
            log_box_floor(vectors["low"], vectors["high"])
        except ValueError as e:
            raise ValueError(f"CRM policy: {e}") from None
        for name, v in vectors.items():
            setattr(self, name, v)
        self.scale = params.get("scale")
        if self.scale is not None:
            bad = isinstance(self.scale, bool) or np.ndim(self.scale) != 0
            if bad or not np.isfinite(_float_array(params, "scale")):
                raise ValueError(f"CRM policy: scale must be a finite number or None, got {self.scale!r}")
            self.scale = float(self.scale)
        self.context_dim = d
        self.deployed = str(params.get("deployed", "policy"))  # which certified candidate: "policy", "mean", …

    def to_params(self) -> dict:
        """The fields as plain JSON values (what the store keeps)."""
        out = {k: getattr(self, k).tolist() for k in ("weight", *CRM_VECTORS, "obs_mean", "obs_std")}
        return out | {"scale": self.scale, "deployed": self.deployed}

    def mean_log_weights(self, context: np.ndarray) -> np.ndarray:
        """m(x) [B, K] for request contexts [B, context_dim] (ValueError on another width)."""
        if np.shape(context)[-1] != self.context_dim:
            raise ValueError(
                f"the CRM policy reads {self.context_dim} context features, the request has {np.shape(context)[-1]}"
            )
        z = ((np.asarray(context, np.float64) - self.obs_mean) / self.obs_std) @ self.weight.T + self.bias
        mean = self.low + (self.high - self.low) / (1.0 + np.exp(-z))
        if self.scale is not None:  # rankings are invariant along (1, …, 1): the logs' mean log-weight
            mean = np.clip(mean + (self.scale - mean.mean(axis=-1, keepdims=True)), self.low, self.high)
        return mean


def operating_point_store(store_prefix: str, initial_lambda: float = 0.5):
    """The utility agent's live operating point λ (and the weights it last chose) under ``store_prefix``."""
    return get_or_create_store(f"{store_prefix}_operating_point", {"lambda": float(initial_lambda), "weights": None})


def crm_store(store_prefix: str):
    """The versioned store a recommend app follows for the CRM weight policy ({}: none published)."""
    return get_or_create_store(f"{store_prefix}_crm_policy", {})


def publish_crm(store_prefix: str, params: dict | None) -> dict:
    """Hot-update the CRM weight policy every recommend replica of ``store_prefix`` serves (None: none, the
    held weights); returns the store's ack. ``params``: CRMPolicy's fields (``CRM.served_policy_params``)."""
    if params is not None:
        params = CRMPolicy(params).to_params()  # a malformed policy is refused here, never published
    return ray.get(crm_store(store_prefix).put.remote(params or {}))
