"""Pieces the algorithms share: the MLP builder their modules use, and the plumbing behind each
AlgorithmConfig's own options method (``.outer_controller(…)``, ``.utility_agent(…)``, ``.unex_rl(…)``)."""

from __future__ import annotations

import copy

from ray.rllib.algorithms.algorithm_config import NotProvided
from torch import nn


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear → activation for each hidden width, then a linear output layer."""
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), activation()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def init_options(config, options: dict) -> None:
    """Give a config its own options' defaults (copied: configs must not share mutable defaults)."""
    for k, v in options.items():
        setattr(config, k, copy.deepcopy(v))


def set_options(config, options: dict, kwargs: dict, method: str):
    """Set ``kwargs`` on the config, the RLlib way (NotProvided leaves a value as it is); unknown
    names are a ValueError that lists the known ones."""
    unknown = set(kwargs) - set(options)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {sorted(unknown)}; known: {sorted(options)}")
    for k, v in kwargs.items():
        if v is not NotProvided:
            setattr(config, k, v)
    return config
