"""Catalogue and users: static, seeded, structure-of-arrays (NumPy), built in one vectorised pass.

Both are drawn from one ``np.random.Generator`` seeded by ``seed_sequence(config.seed, name)``,
so the catalogue does not change when the user count does and vice versa.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .config import WorldConfig

COHORTS = ("new", "casual", "power")


def seed_sequence(seed: int, *stream: str | int) -> np.random.Generator:
    """One seed formula for the whole world: Generator(PCG64(SeedSequence([seed, *hash(stream)]))).

    ``stream`` names a purpose (e.g. "catalogue", "session", request id) so independent parts
    draw independent, reproducible numbers: g = PCG64(SeedSequence(seed ⊕ stream)). A text stream
    enters as its first 8 bytes (little-endian), so names must differ there ("crm-logging-0" and
    "crm-logging-r1-0" are one stream); kept as is because every preset's world is drawn through it.
    """
    words = [int(seed)]
    for s in stream:
        words.append(
            int(s)
            if isinstance(s, (int, np.integer))
            else int.from_bytes(str(s).encode()[:8].ljust(8, b"\0"), "little")
        )
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def user_uniform(user_ids: np.ndarray, salt: int | str) -> np.ndarray:
    """A fixed u ∈ [0, 1) per user id: u = splitmix64(id + φ·(salt + 1)) / 2⁶⁴ (φ = 0x9E3779B97F4A7C15; a text
    salt enters as the first 8 bytes of its BLAKE2b digest). The same user gets the same u whatever else
    happens, so a user stays on one side of a split (A/B arms, train/test folds) for as long as the salt."""
    if not isinstance(salt, (int, np.integer)):
        salt = int.from_bytes(hashlib.blake2b(str(salt).encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        x = np.asarray(user_ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64((int(salt) + 1) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-9)


@dataclass(frozen=True)
class Catalogue:
    """N items: embedding, category, quality, clickbaitiness, duration, price, margin, popularity."""

    embedding: np.ndarray  # float32 [N, d], unit norm
    category: np.ndarray  # int32 [N]
    quality: np.ndarray  # float32 [N] in (0, 1)
    clickbait: np.ndarray  # float32 [N] in [0, 1]
    duration_s: np.ndarray  # float32 [N]
    price: np.ndarray  # float32 [N]
    margin: np.ndarray  # float32 [N] fraction of price
    popularity: np.ndarray  # float32 [N] log-popularity prior (what a popularity baseline sees)
    category_centroids: np.ndarray  # float32 [C, d]

    @property
    def n(self) -> int:
        return len(self.category)

    @staticmethod
    def build(cfg: WorldConfig) -> Catalogue:
        rng = seed_sequence(cfg.seed, "catalogue")
        n, c, d = cfg.n_items, cfg.n_categories, cfg.embed_dim
        centroids = _unit(rng.standard_normal((c, d))).astype(np.float32)
        cat_p = 1.0 / np.arange(1, c + 1) ** cfg.category_zipf
        category = rng.choice(c, size=n, p=cat_p / cat_p.sum()).astype(np.int32)
        embedding = _unit(centroids[category] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d) * 2).astype(np.float32)
        # "Trashy" categories (RecSim): a share of categories carries clickbait, low quality.
        trashy = rng.random(c) < cfg.clickbait_share
        clickbait = np.where(trashy[category], rng.beta(5, 2, n), rng.beta(1, 6, n)).astype(np.float32)
        quality = np.clip(rng.beta(4, 3, n) - 0.35 * clickbait, 0.01, 0.99).astype(np.float32)
        tail = rng.random(n) < cfg.duration_tail_frac
        duration = np.where(
            tail,
            np.minimum(rng.lognormal(np.log(30.0), 0.8, n), 315.0),
            rng.lognormal(np.log(cfg.duration_median_s), cfg.duration_log_sd, n),
        ).astype(np.float32)
        price = rng.lognormal(np.log(20.0), 0.8, n).astype(np.float32)
        margin = rng.uniform(0.1, 0.4, n).astype(np.float32)
        popularity = (0.8 * quality + 0.6 * clickbait + 0.5 * rng.standard_normal(n)).astype(np.float32)
        return Catalogue(embedding, category, quality, clickbait, duration, price, margin, popularity, centroids)


@dataclass(frozen=True)
class Users:
    """M users: latent preference, cohort, propensities, patience."""

    preference: np.ndarray  # float32 [M, d], unit norm (hidden ground truth)
    model_embedding: np.ndarray  # float32 [M, d] what a trained user tower would output (noisy)
    cohort: np.ndarray  # int8 [M] index into COHORTS
    click_propensity: np.ndarray  # float32 [M] log-odds offset
    dwell_propensity: np.ndarray  # float32 [M] watch-ratio multiplier
    purchase_propensity: np.ndarray  # float32 [M] log-odds offset
    patience: np.ndarray  # float32 [M] initial temper (requests)
    baseline_satisfaction: np.ndarray  # float32 [M] log-odds
    taste: np.ndarray | None = None  # float32 [M, 3] hidden (click, watch, purchase) taste τ; None = off

    @property
    def n(self) -> int:
        return len(self.cohort)

    @staticmethod
    def build(cfg: WorldConfig, catalogue: Catalogue) -> Users:
        rng = seed_sequence(cfg.seed, "users")
        m, d = cfg.n_users, cfg.embed_dim
        # Preference: a mix of 1-3 category centroids plus individual taste.
        k = catalogue.category_centroids.shape[0]
        mix = rng.dirichlet(np.full(k, 0.15), size=m).astype(np.float32)
        preference = _unit(mix @ catalogue.category_centroids + 0.5 * rng.standard_normal((m, d)) / np.sqrt(d) * 2)
        model_embedding = _unit(preference + cfg.model_embedding_noise * rng.standard_normal((m, d)) / np.sqrt(d) * 2)
        cohort = rng.choice(3, size=m, p=np.asarray(cfg.cohort_shares)).astype(np.int8)
        patience_mult = np.asarray(cfg.cohort_patience, np.float32)[cohort]
        patience = (rng.lognormal(np.log(cfg.temper_median), cfg.temper_log_sd, m) * patience_mult).astype(np.float32)
        return Users(
            preference=preference.astype(np.float32),
            model_embedding=model_embedding.astype(np.float32),
            cohort=cohort,
            click_propensity=rng.normal(0.0, 0.4, m).astype(np.float32),
            dwell_propensity=rng.lognormal(0.0, 0.15, m).astype(np.float32),
            purchase_propensity=rng.normal(0.0, 0.5, m).astype(np.float32),
            patience=np.maximum(patience, 1.0),
            baseline_satisfaction=rng.normal(0.0, 0.5, m).astype(np.float32),
            taste=_taste(cfg, model_embedding, cohort),
        )


def _taste(cfg: WorldConfig, model_embedding: np.ndarray, cohort: np.ndarray) -> np.ndarray | None:
    """Hidden engagement-type taste τ [M, 3] = sd ⊙ (√ρ·z + √(1−ρ)·ε) + shift[cohort] (None when all zero).

    z: the user tower's embedding on 3 fixed random directions, standardised over users, so the
    observable context carries a share ρ of each component's variance. Drawn from its own stream
    ("taste"), so turning taste on leaves every other draw of the world unchanged.
    """
    sd, shift = np.asarray(cfg.taste_sd, np.float64), np.asarray(cfg.taste_cohort_shift, np.float64)
    if not (sd.any() or shift.any()):
        return None
    rng = seed_sequence(cfg.seed, "taste")
    z = model_embedding @ _unit(rng.standard_normal((cfg.embed_dim, 3)).T).T
    z = (z - z.mean(axis=0)) / z.std(axis=0).clip(1e-9)
    rho = cfg.taste_observed_share
    eps = rng.standard_normal(z.shape)
    return (sd * (np.sqrt(rho) * z + np.sqrt(1 - rho) * eps) + shift[cohort]).astype(np.float32)
