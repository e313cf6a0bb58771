"""Every offline learner by name: ours (configs on the algorithm base: ``td3``, ``bcq``, ``uwac``) and RLlib's
(``bc``, ``cql``, ``iql``: ``rllib_policies.offline.shipped``)."""

from __future__ import annotations

from .bcq import BCQConfig
from .common import OfflineConfig
from .shipped import SHIPPED
from .td3 import TD3Config
from .uwac import UWACConfig

OWN = {"td3": TD3Config, "bcq": BCQConfig, "uwac": UWACConfig}
LEARNERS = (*OWN, *SHIPPED)


def own_config(name: str, options: dict | None = None) -> OfflineConfig:
    """A fresh config of our learner ``name`` with its own options set (``.td3(...)``, ``.bcq(...)``, ``.uwac(...)``:
    the method named after the learner)."""
    if name not in OWN:
        raise ValueError(f"unknown offline learner {name!r}; ours are {tuple(OWN)}, RLlib's {SHIPPED}")
    config = OWN[name]()
    return getattr(config, name)(**(options or {}))
