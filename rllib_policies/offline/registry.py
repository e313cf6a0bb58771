"""Every offline learner by name: ours (configs on the algorithm base: ``td3``, ``bcq``, ``uwac``) and RLlib's
(``bc``, ``cql``, ``iql``: ``rllib_policies.offline.shipped``)."""

from __future__ import annotations

import inspect

from .bcq import BCQConfig
from .common import OfflineConfig
from .shipped import SHIPPED
from .td3 import TD3Config
from .uwac import UWACConfig

OWN = {"td3": TD3Config, "bcq": BCQConfig, "uwac": UWACConfig}
LEARNERS = (*OWN, *SHIPPED)
OPTIONS = {"td3": ("td3",), "bcq": ("bcq",), "uwac": ("uwac", "td3")}  # each learner's options methods, own first


def own_config(name: str, options: dict | None = None) -> OfflineConfig:
    """A fresh config of our learner ``name`` with its options set, each through the options method that takes
    it (``.td3(...)``, ``.bcq(...)``, ``.uwac(...)``; UWAC also takes TD3's); an option none takes is an error
    naming it."""
    if name not in OWN:
        raise ValueError(f"unknown offline learner {name!r}; ours are {tuple(OWN)}, RLlib's {SHIPPED}")
    config, left = OWN[name](), dict(options or {})
    for method in OPTIONS[name]:
        takes = set(inspect.signature(getattr(config, method)).parameters)
        mine = {k: left.pop(k) for k in list(left) if k in takes}
        config = getattr(config, method)(**mine)
    if left:
        raise ValueError(f"{name} has no option(s) {sorted(left)}; its options methods are {OPTIONS[name]}")
    return config
