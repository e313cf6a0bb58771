"""Network pieces the algorithms' RLModules share."""

from __future__ import annotations

from torch import nn


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear → activation for each hidden width, then a linear output layer."""
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), activation()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, d_out))
