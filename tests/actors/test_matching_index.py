"""Matching's retrieval index: the MIPS → L2 transform is exact when every cell is probed, the approximate
index's recall at the default probe count, the exact index equals matching's brute force, bad snapshots."""

import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.cascade import Pipeline
from actors.matching_index import MatchingIndex, recall_at_k, resolve_kind
from actors.stages import DEFAULT_PARAMS, RequestBatch, StageContext, matching, user_query
from actors.world import PipelineConfig, World, WorldConfig
from tests.conftest import readers_registered

N_ITEMS = 20_000


@pytest.fixture(scope="module")
def ctx() -> StageContext:
    return StageContext(World(WorldConfig(n_items=N_ITEMS, n_users=500)), 0)


@pytest.fixture(scope="module")
def ivf(ctx) -> MatchingIndex:
    return MatchingIndex.for_config(ctx, PipelineConfig(matching_index="ivf"))


def queries(ctx, b: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    req = RequestBatch(rng.integers(0, 500, b), rng.integers(-1, N_ITEMS, (b, 20)), np.zeros(b, np.int32))
    return user_query(ctx, req, np.full(b, DEFAULT_PARAMS["matching"][2], np.float32))


@settings(max_examples=15, deadline=None)
@given(w_rel=st.floats(0.0, 3.0), w_pop=st.floats(0.0, 2.0), seed=st.integers(0, 1000))
def test_probing_every_cell_finds_the_exact_top_k(ctx, w_rel, w_pop, seed):
    """With nprobe = nlist the IVF search is exhaustive: the transform makes L2 order = score order."""
    full = MatchingIndex(ctx.item_tower[:3000], ctx.popularity[:3000], "ivf", nlist=16, nprobe=16)
    exact = MatchingIndex(ctx.item_tower[:3000], ctx.popularity[:3000], "exact")
    q = queries(ctx, 8, seed)
    w = (np.full(8, w_rel, np.float32), np.full(8, w_pop, np.float32))
    probed = full._probe(q, *w, 50)  # the faiss search itself, before any exact fallback
    assert (probed >= 0).all()
    got_scores = (
        w[0][:, None] * np.einsum("bd,bkd->bk", q, full.item_tower[probed]) + w[1][:, None] * (full.popularity[probed])
    )
    want, want_scores = exact.search(q, *w, 50)
    # the 50th score may tie: compare the scores, recomputed exactly for both
    np.testing.assert_allclose(np.sort(got_scores, axis=1), np.sort(want_scores, axis=1), rtol=1e-4, atol=1e-4)


def test_default_probes_reach_the_recall_target(ctx, ivf):
    q = queries(ctx)
    w_rel, w_pop = np.ones(len(q), np.float32), np.full(len(q), 0.05, np.float32)
    approx, _ = ivf.search(q, w_rel, w_pop, 500)
    exact, _ = MatchingIndex(ctx.item_tower, ctx.popularity, "exact").search(q, w_rel, w_pop, 500)
    assert recall_at_k(approx, exact) >= 0.95  # held-out queries (with histories): calibration is not overfit
    assert ivf.nlist == int(np.sqrt(N_ITEMS)) and ivf.nprobe < ivf.nlist and ivf.calibrated_recall >= 0.95


def test_exact_index_is_matchings_brute_force(ctx):
    """An exact index over the context's own towers (a catalogue update of the same arrays) serves what
    matching serves without one: same candidates, same scores, same exploration noise."""
    req = RequestBatch(np.arange(6), np.full((6, 20), -1, np.int64), np.zeros(6, np.int32), request_id=7)
    plain = matching(ctx, req, k=100, seed=3)
    indexed = matching(ctx, req, k=100, seed=3, index=MatchingIndex(ctx.item_tower, ctx.popularity, "exact"))
    np.testing.assert_array_equal(plain.items, indexed.items)
    np.testing.assert_array_equal(plain.scores, indexed.scores)


def test_recall_never_counts_a_missing_item_as_a_hit():
    exact = np.array([[1, 2, 3, 4, 5]])
    assert recall_at_k(np.array([[-1, -1, -1, -1, 5]]), exact) == pytest.approx(0.2)
    assert recall_at_k(np.array([[5, 4, 3, 2, 1]]), exact) == 1.0


def test_ann_matching_explores_within_its_pool(ctx, ivf):
    """Exploration noise picks k of the index's top pool·k: candidates are valid, distinct, and with no
    exploration they are the index's top k."""
    req = RequestBatch(np.arange(4), np.full((4, 20), -1, np.int64), np.zeros(4, np.int32), request_id=np.arange(4))
    greedy = np.array([1.0, 0.05, 0.5, 0.0], np.float32)
    out = matching(ctx, req, greedy, k=200, index=ivf, pool=2)
    assert out.items.shape == (4, 200) and all(len(set(r)) == 200 for r in out.items)
    q = user_query(ctx, req, np.full(4, 0.5, np.float32))
    top, _ = ivf.search(q, np.ones(4, np.float32), np.full(4, 0.05, np.float32), 200)
    assert recall_at_k(out.items, top) >= 0.99  # the same cells probed; float ties may swap one at the boundary
    explored = matching(ctx, req, DEFAULT_PARAMS["matching"], k=200, index=ivf, pool=2)
    assert recall_at_k(explored.items, top) < 0.95


def test_the_pipeline_builds_an_index_only_where_asked():
    world = World(WorldConfig(n_items=2000, n_users=100))
    assert Pipeline(world).ctx.index is None  # auto: exact below 200 000 items
    pipe = Pipeline(world, PipelineConfig(matching_index="ivf", k_matching=100))
    assert pipe.ctx.index.kind == "ivf"
    req = RequestBatch(np.arange(3), np.full((3, 20), -1, np.int64), np.zeros(3, np.int32))
    assert pipe.recommend(req).slate.shape == (3, 10)
    assert resolve_kind("auto", 200_000) == "ivf" and resolve_kind("auto", 199_999) == "exact"


def save(tmp_path, name="cat.npz", **arrays) -> str:
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, msg",
    [
        ({"item_tower": np.ones((10, 4))}, r"missing array\(s\) \['popularity'\]"),
        ({"item_tower": np.ones((9, 4)), "popularity": np.zeros(10)}, r"item_tower must have shape \(10, 4\)"),
        ({"item_tower": np.ones((10, 4)), "popularity": np.zeros(9)}, r"popularity must have shape \(10,\)"),
        ({"item_tower": np.full((10, 4), np.nan), "popularity": np.zeros(10)}, "must be finite"),
        ({"item_tower": np.zeros((10, 4)), "popularity": np.zeros(10)}, "all-zero row"),
    ],
)
def test_bad_catalogue_snapshots_are_refused(tmp_path, arrays, msg):
    with pytest.raises(ValueError, match=msg):
        MatchingIndex.from_file(save(tmp_path, **arrays), 10, 4)


def test_unreadable_snapshot_and_bad_config(tmp_path):
    with pytest.raises(ValueError, match="cannot read catalogue snapshot"):
        MatchingIndex.from_file(str(tmp_path / "absent.npz"), 10, 4)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="BadZipFile"):
        MatchingIndex.from_file(str(tmp_path / "corrupt.npz"), 10, 4)
    np.save(tmp_path / "one.npy", np.ones((10, 4)))
    with pytest.raises(ValueError, match="not an .npz archive"):
        MatchingIndex.from_file(str(tmp_path / "one.npy"), 10, 4)
    towers = np.full((10, 4), 1e30, np.float32)  # ‖v‖² overflows float32: normalised in float64
    unit, _ = MatchingIndex.from_file(save(tmp_path, item_tower=towers, popularity=np.zeros(10)), 10, 4)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="matching_index must be"):
        PipelineConfig(matching_index="hnsw")
    with pytest.raises(ValueError, match="ann_pool >= 1"):
        PipelineConfig(ann_pool=0)
    with pytest.raises(ValueError, match="kind must be"):
        MatchingIndex(np.ones((10, 4)), np.zeros(10), "auto")


def test_a_snapshot_a_replica_cannot_load_is_never_acknowledged(ray_session, tmp_path):
    """The PUT checks the file, but a replica may not see it (deleted since, another filesystem): the replica
    keeps its index and version, leaves the update unacknowledged, and says why."""
    from actors.stage_actors import ServedStage, catalogue_store

    prefix = f"idx_{uuid.uuid4().hex[:8]}"
    world = WorldConfig(n_items=2000, n_users=100)
    stage = ServedStage("matching", world, PipelineConfig(k_matching=100, matching_index="ivf"), prefix, "r1")
    try:
        assert stage.describe_index()["kind"] == "ivf" and stage.describe_index()["last_error"] is None
        store = catalogue_store(prefix)
        readers_registered(store, ["r1"])
        ack = ray_session.get(store.put.remote({"path": str(tmp_path / "gone.npz")}, None, 1.0))
        assert ack["readers_acked"] == 0 and ack["readers_live"] == 1
        described = stage.describe_index()
        assert described["version"] == 1 and described["kind"] == "ivf" and "not applied" in described["last_error"]
        req = RequestBatch(np.arange(2), np.full((2, 20), -1, np.int64), np.zeros(2, np.int32))
        result = stage.run(req)
        assert result.index_version == 1 and result.out.items.shape == (2, 100)
    finally:
        stage.stop()
