"""Matching's retrieval index: the top candidates of score_i = w_rel·⟨q, v_i⟩ + w_pop·pop_i over the catalogue.

exact  every item scored (``actors.stages.matching``'s brute force): the reference, and the default for small
       catalogues and in tests.
ivf    approximate: faiss ``IndexIVFFlat`` (k-means cells, ``nprobe`` of ``nlist`` scanned per query) over the
       maximum-inner-product → L2 transform of Bachrach et al. (2014):

           x_i = [v_i, pop_i, √(M − ‖[v_i, pop_i]‖²)],   y = [w_rel·q, w_pop, 0],   M = max_i ‖[v_i, pop_i]‖²

       so ‖x_i − y‖² = M + ‖y‖² − 2·(w_rel·⟨q, v_i⟩ + w_pop·pop_i): the nearest x_i are the best-scoring items
       for *any* per-request weights (w_rel, w_pop), with one index. The candidates' scores are recomputed
       exactly. Chosen on measurement (benchmarks/results/recommend.md, 1 000 000 items, 16-d towers, one
       thread): IVF-Flat builds and calibrates in ~2 s, HNSW-Flat (M 32) in ~180 s, at similar query cost for
       recall ≈ 0.96–0.97 (1.4 vs 1.1 ms): a catalogue update rebuilds IVF while the replica serves.

An index is immutable: a catalogue update builds a new one (``MatchingIndex.from_file``) and the serving
replica swaps the reference (actors.stage_actors.ServedStage follows the catalogue store), so requests in
flight finish on the old one.
"""

from __future__ import annotations

import time
import zipfile

import numpy as np

ANN_AUTO_ITEMS = 200_000  # matching_index "auto": ivf from this many items, exact below
INDEX_KINDS = ("auto", "exact", "ivf")


class MatchingIndex:
    """The item vectors matching scores (towers [N, d] unit-norm, popularity [N] standardised) and, for ivf,
    the faiss index over them. ``version`` and ``source`` name the catalogue snapshot it was built from."""

    def __init__(
        self,
        item_tower: np.ndarray,
        popularity: np.ndarray,
        kind: str = "exact",
        nlist: int = 0,
        nprobe: int = 0,
        version: int = 1,
        source: str | None = None,
        calibrate: tuple[np.ndarray, int, float] | None = None,
    ):
        item_tower = np.ascontiguousarray(item_tower, np.float32)
        popularity = np.ascontiguousarray(popularity, np.float32)
        check_catalogue(item_tower, popularity)
        if kind not in ("exact", "ivf"):
            raise ValueError(f"kind must be 'exact' or 'ivf', got {kind!r}")
        self.item_tower, self.popularity, self.kind = item_tower, popularity, kind
        self.version, self.source, self.n = int(version), source, len(item_tower)
        self.nlist = self.nprobe = 0
        self.calibrated_recall: float | None = None
        started = time.perf_counter()
        self.faiss_index = self._build_ivf(nlist, nprobe) if kind == "ivf" else None
        if self.faiss_index is not None and not nprobe:
            self._calibrate(*(calibrate or (np.asarray(self.item_tower[:64]), min(500, self.n), 0.95)))
        self.build_s = time.perf_counter() - started

    @classmethod
    def for_config(cls, ctx, config, version: int = 1, source: str | None = None, arrays=None) -> MatchingIndex | None:
        """The index ``config.matching_index`` asks for on ``ctx``'s towers (or ``arrays`` = (towers, popularity)
        from a catalogue update); None where that is plain exact search on the context's own towers."""
        kind = resolve_kind(config.matching_index, ctx.world.config.n_items)
        if kind == "exact" and arrays is None:
            return None
        towers, popularity = arrays if arrays is not None else (ctx.item_tower, ctx.popularity)
        users = ctx.user_tower[np.random.default_rng(1).choice(len(ctx.user_tower), 64)]  # calibration queries
        calibrate = (users, min(config.k_matching, len(towers)), config.ann_recall)
        return cls(towers, popularity, kind, config.ann_nlist, config.ann_nprobe, version, source, calibrate)

    @classmethod
    def from_file(cls, path: str, n_items: int, embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Load and check a catalogue snapshot (.npz with ``item_tower`` [N, d] and ``popularity`` [N]); a
        ValueError names the field and the problem."""
        try:
            f = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read catalogue snapshot {path!r}: {type(e).__name__}: {e}") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not an .npz archive of named arrays (np.savez writes one)")
        with f:
            missing = {"item_tower", "popularity"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: missing array(s) {sorted(missing)} (has {sorted(f.files)})")
            try:
                towers, popularity = f["item_tower"].astype(np.float32), f["popularity"].astype(np.float32)
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"cannot read catalogue snapshot {path!r}: {type(e).__name__}: {e}") from None
        if towers.shape != (n_items, embed_dim):
            raise ValueError(f"item_tower must have shape ({n_items}, {embed_dim}), got {towers.shape}")
        if popularity.shape != (n_items,):
            raise ValueError(f"popularity must have shape ({n_items},), got {popularity.shape}")
        check_catalogue(towers, popularity)
        unit = towers / np.linalg.norm(towers.astype(np.float64), axis=1, keepdims=True)  # float64: no overflow
        return unit.astype(np.float32), popularity

    def _build_ivf(self, nlist: int, nprobe: int):
        import faiss  # noqa: PLC0415  only ivf needs it

        faiss.omp_set_num_threads(1)  # one core per replica: faiss's threads would contend with the request loop
        x = np.concatenate([self.item_tower, self.popularity[:, None]], axis=1)
        sq = (x * x).sum(axis=1)
        x = np.concatenate([x, np.sqrt(np.maximum(sq.max() - sq, 0.0))[:, None]], axis=1).astype(np.float32)
        self.nlist = nlist or int(np.clip(np.sqrt(self.n), 1, max(1, self.n // 39)))  # faiss: ≥ 39 points a cell
        self.nprobe = min(self.nlist, nprobe or self.nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], self.nlist, faiss.METRIC_L2)
        sample = x if self.n <= 50 * self.nlist else x[np.random.default_rng(0).choice(self.n, 50 * self.nlist, False)]
        index.train(sample)
        index.add(x)
        index.nprobe = self.nprobe
        return index

    def _calibrate(self, queries: np.ndarray, k: int, target: float) -> None:
        """The fewest probed cells (growing by half from 2 % of them) whose recall@k against exact search, on
        ``queries`` at matching's default weights, reaches ``target``: how much of the catalogue a query must
        scan depends on k / N, which no fixed fraction covers (20 000 items need ~60 % of the cells for
        recall@500 ≥ 0.95, 1 000 000 items ~20 %)."""
        w_rel, w_pop = np.ones(len(queries), np.float32), np.full(len(queries), 0.05, np.float32)
        exact, _ = exact_search(self.item_tower, self.popularity, queries, w_rel, w_pop, k)
        nprobe = max(1, int(np.ceil(0.02 * self.nlist)))
        while True:
            self.faiss_index.nprobe = self.nprobe = min(nprobe, self.nlist)
            self.calibrated_recall = recall_at_k(self._probe(queries, w_rel, w_pop, k), exact)  # -1s count as misses
            if self.calibrated_recall >= target or self.nprobe == self.nlist:
                return
            nprobe = int(np.ceil(nprobe * 1.5))

    def search(self, query: np.ndarray, w_rel: np.ndarray, w_pop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` items by w_rel·⟨q, v⟩ + w_pop·pop for queries q [B, d] (approximate for ivf; rows the
        index cannot fill are searched exactly): (items [B, k] unordered, exact scores [B, k])."""
        if self.faiss_index is None:
            return exact_search(self.item_tower, self.popularity, query, w_rel, w_pop, k)
        items = self._probe(query, w_rel, w_pop, k)
        short = (items < 0).any(axis=1)
        if short.any():  # fewer than k items in the probed cells: exact for those rows
            sub = np.flatnonzero(short)
            items[sub] = exact_search(self.item_tower, self.popularity, query[sub], w_rel[sub], w_pop[sub], k)[0]
        scores = (
            w_rel[:, None] * np.einsum("bd,bkd->bk", query, self.item_tower[items])
            + w_pop[:, None] * (self.popularity[items])
        )
        return items, scores.astype(np.float32)

    def _probe(self, query: np.ndarray, w_rel: np.ndarray, w_pop: np.ndarray, k: int) -> np.ndarray:
        """The faiss search on the transformed queries: items [B, k], -1 where the probed cells ran out."""
        y = np.concatenate([w_rel[:, None] * query, w_pop[:, None], np.zeros((len(query), 1), np.float32)], axis=1)
        return self.faiss_index.search(np.ascontiguousarray(y, np.float32), k)[1]

    def describe(self) -> dict:
        """What ``GET /matching/index`` reports."""
        return {
            "version": self.version,
            "kind": self.kind,
            "n_items": self.n,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "calibrated_recall": self.calibrated_recall,
            "build_s": round(self.build_s, 3),
            "source": self.source,
        }


def exact_search(item_tower, popularity, query, w_rel, w_pop, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every item scored; (top-k items [B, k] unordered, their scores)."""
    scores = w_rel[:, None] * (query @ item_tower.T) + w_pop[:, None] * popularity
    items = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return items, np.take_along_axis(scores, items, axis=1)


def resolve_kind(kind: str, n_items: int) -> str:
    """``auto`` → ivf from ANN_AUTO_ITEMS items, else exact."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"matching_index must be one of {INDEX_KINDS}, got {kind!r}")
    return ("ivf" if n_items >= ANN_AUTO_ITEMS else "exact") if kind == "auto" else kind


def check_catalogue(item_tower: np.ndarray, popularity: np.ndarray) -> None:
    if item_tower.ndim != 2 or popularity.shape != (len(item_tower),):
        shapes = f"{item_tower.shape}, {popularity.shape}"
        raise ValueError(f"item_tower [N, d] and popularity [N] must share N, got {shapes}")
    if not (np.isfinite(item_tower).all() and np.isfinite(popularity).all()):
        raise ValueError("item_tower and popularity must be finite")
    if (np.abs(item_tower).max(axis=1) == 0).any():
        raise ValueError("item_tower has an all-zero row (towers are unit vectors)")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approx ∩ exact| / k over rows (the standard ANN recall@k); faiss's -1 (no item) is never a hit."""
    k = exact.shape[1]
    return float(np.mean([np.isin(e, a[a >= 0]).sum() / k for a, e in zip(approx, exact)]))
