"""World configuration: typed defaults, each tied to a row of shared/WORLD_FACTS.md (docs/world.md).

Structural choices are presets (``WorldConfig.preset(name)``) so an experiment can report whether
its conclusion holds across click models, position-bias strength, CTR scale and satisfaction
sensitivity on both sides of RecSim's clickbait crossover.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# ULTRA's PBM examination for ranks 1-10 (Joachims et al. eye tracking), WORLD_FACTS "Position bias".
ULTRA_PBM_TOP10 = (0.68, 0.61, 0.48, 0.34, 0.28, 0.20, 0.11, 0.10, 0.08, 0.06)
# KuaiRand-Pure days between active days, P(1..7); the rest is "more than 7".
KUAIRAND_RETURN_GAP = (0.617, 0.165, 0.079, 0.047, 0.031, 0.021, 0.014)


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    # ---- catalogue
    n_items: int = 20_000
    n_categories: int = 40
    embed_dim: int = 16
    category_zipf: float = 1.1  # category popularity skew
    duration_median_s: float = 9.6  # KuaiRec video duration median (IQR 7.4-12.2)
    duration_log_sd: float = 0.37  # ≈ ln(12.2/7.4)/1.349
    duration_tail_frac: float = 0.08  # heavy tail to 315 s (KuaiRec mean 14.6 s)
    clickbait_share: float = 0.3  # RecSim: ~70 % of clusters are not "trashy"
    # ---- users
    n_users: int = 10_000
    cohort_shares: tuple[float, float, float] = (0.2, 0.55, 0.25)  # new, casual, power
    cohort_patience: tuple[float, float, float] = (0.6, 1.0, 1.6)  # temper multiplier
    # ---- examination (position bias)
    click_model: str = "pbm"  # "pbm" | "cascade"
    pbm_eta: float | None = None  # None: ULTRA's table (ranks 1-10) then (1/r)^1; else (1/r)^eta
    cascade_attention: float = 0.9  # RecSim cascade: keep examining with this probability
    # ---- rates
    target_ctr: float = 0.04  # Ali-CCP feed CTR per impression (3.6-4 %)
    purchase_given_click: float = 0.005  # Ali-CCP conversion given click (0.5 %)
    affinity_click_slope: float = 4.0  # log-odds of a click per unit of user-item affinity
    clickbait_click_lift: float = 1.5  # log-odds lift of a fully clickbait item
    # ---- dwell: watch ratio ≈ Weibull(k 1.3, λ 0.91) (KuaiRec), modulated by relevance
    watch_weibull_k: float = 1.3
    watch_weibull_scale: float = 0.91
    watch_relevance_slope: float = 0.6
    watch_ratio_cap: float = 5.0
    # ---- session: KuaiSim-style temper, RecSim-style satisfaction
    temper_median: float = 5.0  # requests a neutral session lasts (≈ 50 items at slate 10)
    temper_log_sd: float = 0.6
    temper_click_refund: float = 0.35  # temper regained per click
    temper_dissatisfaction_cost: float = 1.0
    npe_decay: float = 0.7  # RecSim NPE ← 0.7·NPE − 2(c − 0.5) + N(0, 0.05)
    npe_noise: float = 0.05
    satisfaction_sensitivity: float = 0.2  # RecSim crossover ≈ 0.067: 0.2 sits on the trade-off side
    repetition_penalty: float = 0.5  # NPE cost of a slate dominated by already-seen categories
    max_requests: int = 40  # hard cap on a session (requests)
    # ---- delayed return (retention)
    return_gap_probs: tuple[float, ...] = KUAIRAND_RETURN_GAP
    return_satisfaction_tilt: float = 2.0  # log-odds shift of next-day return per unit satisfaction
    # ---- hidden engagement-type taste (heterogeneous preset; all zero = off, the default world)
    # τ_u = sd ⊙ (√ρ·z_u + √(1−ρ)·ε_u) + cohort shift, z_u = the user tower's embedding projected on 3
    # fixed directions (standardised), so a policy that sees the user tower can learn it; the ranker's
    # heads do not see τ (a multi-task model trained on pooled data). Components: click log-odds, log
    # watch-ratio scale, purchase log-odds.
    taste_sd: tuple[float, float, float] = (0.0, 0.0, 0.0)
    taste_observed_share: float = 0.6  # ρ: share of taste variance carried by the user tower
    taste_cohort_shift: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0),) * 3  # new, casual, power
    # ---- ranking model (stands in for a trained multi-task ranker)
    prediction_noise: float = 0.3  # logit-scale noise on p_click / p_dwell / p_purchase
    model_embedding_noise: float = 0.35  # two-tower towers see noisy embeddings

    def __post_init__(self) -> None:
        checks = {
            "n_items": self.n_items >= 10,
            "n_users": self.n_users >= 1,
            "n_categories": self.n_categories >= 1,
            "click_model": self.click_model in ("pbm", "cascade"),
            "target_ctr": 0 < self.target_ctr < 1,
            "purchase_given_click": 0 <= self.purchase_given_click < 1,
            "cohort_shares": abs(sum(self.cohort_shares) - 1) < 1e-6,
            "satisfaction_sensitivity": self.satisfaction_sensitivity >= 0,
            "cascade_attention": 0 < self.cascade_attention <= 1,
            "taste_sd": len(self.taste_sd) == 3 and min(self.taste_sd) >= 0,
            "taste_observed_share": 0 <= self.taste_observed_share <= 1,
            "taste_cohort_shift": len(self.taste_cohort_shift) == 3
            and all(len(c) == 3 for c in self.taste_cohort_shift),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid WorldConfig field(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    @staticmethod
    def preset(name: str, **overrides) -> WorldConfig:
        """Named structural variants; see PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown world preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(WorldConfig(), **{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "default": {},
    "pbm_eta_0.5": {"pbm_eta": 0.5},
    "pbm_eta_1": {"pbm_eta": 1.0},
    "pbm_eta_2": {"pbm_eta": 2.0},
    "cascade_0.65": {"click_model": "cascade", "cascade_attention": 0.65},
    "cascade_0.9": {"click_model": "cascade", "cascade_attention": 0.9},
    "ctr_carousel": {"target_ctr": 0.005},  # Open Bandit Dataset 0.35-0.67 %
    "ctr_video": {"target_ctr": 0.46, "pbm_eta": 0.0},  # KuaiRand valid-play rate; autoplay feed: flat examination
    "sensitivity_low": {"satisfaction_sensitivity": 0.01},  # RecSim default: no real trade-off
    "sensitivity_high": {"satisfaction_sensitivity": 0.5},
    # Users differ in *what* they engage with (docs/world.md "Heterogeneous taste"); fixed before any learner ran.
    # τ sd: click and purchase as the default's per-user level terms (0.4, 0.5: assumed, no published per-user
    # figure found); watch 0.35 with the Weibull refitted (k 1.6, λ 0.92) so that the pooled watch ratio still
    # matches KuaiRec as closely as the default does.
    "heterogeneous": {
        "taste_sd": (0.4, 0.35, 0.5),
        "taste_observed_share": 0.6,
        "taste_cohort_shift": ((0.2, -0.2, -0.3), (0.0, 0.0, 0.0), (-0.1, 0.15, 0.3)),
        "watch_weibull_k": 1.6,
        "watch_weibull_scale": 0.92,
    },
}


@dataclass(frozen=True)
class PipelineConfig:
    """Cascade sizes: matching → pre-ranking → ranking (WORLD_FACTS "Cascade sizes")."""

    k_matching: int = 500
    k_pre_ranking: int = 50
    k_slate: int = 10
    history_len: int = 20
    seed: int = 0
    default_params: dict = field(default_factory=dict)
    # matching's retrieval index (actors/matching_index.py): "exact", "ivf" (faiss), or "auto" (ivf from 200 000
    # items); ivf's cells (0: √N), cells scanned per query (0: the fewest reaching recall@k_matching ≥ ann_recall
    # on calibration queries at build), and the candidate pool it fetches, as a multiple of k_matching, before
    # matching's exploration noise picks k_matching of it
    matching_index: str = "auto"
    ann_nlist: int = 0
    ann_nprobe: int = 0
    ann_recall: float = 0.95
    ann_pool: int = 2

    def __post_init__(self) -> None:
        if self.matching_index not in ("auto", "exact", "ivf"):
            raise ValueError(f"matching_index must be 'auto', 'exact' or 'ivf', got {self.matching_index!r}")
        if not 0 < self.ann_recall <= 1:
            raise ValueError(f"ann_recall must be in (0, 1], got {self.ann_recall}")
        if self.ann_nlist < 0 or self.ann_nprobe < 0 or self.ann_pool < 1:
            raise ValueError(
                f"need ann_nlist >= 0, ann_nprobe >= 0, ann_pool >= 1, got {self.ann_nlist}, {self.ann_nprobe}, "
                f"{self.ann_pool}"
            )
        if not (self.k_matching >= self.k_pre_ranking >= self.k_slate >= 1):
            raise ValueError(
                f"need k_matching >= k_pre_ranking >= k_slate >= 1, got "
                f"{self.k_matching}, {self.k_pre_ranking}, {self.k_slate}"
            )
