"""Off-policy evaluation on logged-bandit tables: estimators (grid and continuous weight-vector actions),
intervals that are checked for coverage (normal, bootstrap, ESS-corrected), and an explicit abstain rule.
See docs/ope.md."""

from .data import GaussianPolicy, LoggedBandit, LoggedDensity
from .estimators import (
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    DensityRatioIPS,
    DensityRatioSNIPS,
    Estimator,
    KernelSNIPS,
    RidgeRewardModel,
    SwitchDR,
    TabularMean,
)
from .intervals import (
    AbstainRule,
    Bootstrap,
    EssCorrected,
    Estimate,
    Normal,
    Parts,
    cluster_sums,
    kish_ess,
    normal_quantile,
)

__all__ = [
    "LoggedDensity",
    "GaussianPolicy",
    "LoggedBandit",
    "DM",
    "DR",
    "IPS",
    "SNDR",
    "SNIPS",
    "DensityRatioIPS",
    "DensityRatioSNIPS",
    "Estimator",
    "KernelSNIPS",
    "RidgeRewardModel",
    "SwitchDR",
    "TabularMean",
    "AbstainRule",
    "Bootstrap",
    "Estimate",
    "EssCorrected",
    "Normal",
    "Parts",
    "cluster_sums",
    "kish_ess",
    "normal_quantile",
]
