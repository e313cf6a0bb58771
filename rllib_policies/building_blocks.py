"""Network pieces the algorithms' RLModules share."""

from __future__ import annotations

from torch import nn


def mlp(
    d_in: int, hidden: tuple[int, ...], d_out: int, activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0
) -> nn.Sequential:
    """Linear → activation (→ Dropout(``dropout``) when > 0) for each hidden width, then a linear output layer."""
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), activation(), *([nn.Dropout(dropout)] if dropout > 0 else [])]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, d_out))
