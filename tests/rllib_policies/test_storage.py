"""Artifacts that outlive a job: paths resolve under the storage root (never the job's cwd), every
read / write works on a local path and on an object store (moto's S3 server), and a training job's
checkpoints and ``--resume latest`` work from another cwd and through s3://."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from moto.server import ThreadedMotoServer

from rllib_policies import storage
from rllib_policies.jobs import (
    COMPLETE,
    JobConfig,
    LearnerLost,
    is_dead,
    job_main,
    latest_checkpoint,
    learners_out_of_service,
    lost_worker,
    restore_checkpoint,
    save_checkpoint,
)
from rllib_policies.train_outer_controller import TrainJobConfig, build, progress
from rllib_policies.train_utility_agent import main as train_utility_agent
from rllib_policies.utility_agent.module import load_agent

BUCKET = "morl-test"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# the tiny outer-controller job of test_train_job.py
TINY_JOB = {
    "env_config": {
        "world": {"n_items": 2000, "n_users": 300},
        "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 6},
    },
    "outer_controller": {"sessions_per_iteration": 6, "min_sessions_for_kpi": 12, "kl_rollback_threshold": None},
    "env_runners": {"num_env_runners": 0, "num_envs_per_env_runner": 2},
    "iterations": 2,
    "checkpoint_every": 1,
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $HOME (the default root ~/morl-runs and local mirrors land there) and no $MORL_STORAGE."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    return tmp_path / "home"


# ------------------------------------------------------------------ resolve / storage_root
@pytest.mark.parametrize(
    "path, configured, env, expected",
    [
        ("crm", "/data/runs", None, "/data/runs/crm"),
        ("crm/decision.json", "s3://bucket/morl", None, "s3://bucket/morl/crm/decision.json"),
        ("crm", "s3://bucket/morl/", None, "s3://bucket/morl/crm"),
        ("a/./b/../c", "/data/runs", None, "/data/runs/a/c"),
        ("gs://other/x", "/data/runs", None, "gs://other/x"),  # a URI as given
        ("/abs/ckpt", "s3://bucket/morl", None, "/abs/ckpt"),  # an absolute path as given
        ("oc", None, "/env/root", "/env/root/oc"),  # $MORL_STORAGE
        ("oc", None, "s3://env-bucket/p", "s3://env-bucket/p/oc"),
        ("oc", "/configured", "/env/root", "/configured/oc"),  # configured beats the env
        ("oc", None, None, "{home}/morl-runs/oc"),  # the default ~/morl-runs
        ("~/elsewhere/oc", None, None, "{home}/elsewhere/oc"),
        (".", "/data/runs", None, "/data/runs"),
        ("crm", "s3://bucket/morl?region=eu-west-1", None, "s3://bucket/morl/crm?region=eu-west-1"),
        ("crm", "file:///data/runs", None, "file:///data/runs/crm"),
    ],
)
def test_resolve(home, monkeypatch, path, configured, env, expected):
    if env is not None:
        monkeypatch.setenv(storage.STORAGE_ENV, env)
    assert storage.resolve(path, configured) == expected.format(home=home)


@pytest.mark.parametrize(
    "path, configured, env, match",
    [
        ("", "/data/runs", None, "non-empty"),
        (None, "/data/runs", None, "non-empty"),
        ("../outside", "/data/runs", None, "climbs out"),
        ("a/../../outside", "/data/runs", None, "climbs out"),
        ("oc", "relative/root", None, "configured storage 'relative/root' is a relative path"),
        ("oc", None, "runs", r"\$MORL_STORAGE 'runs' is a relative path"),
        ("oc", "", None, "expected an absolute path or a URI"),
        ("oc", "  ", None, "expected an absolute path or a URI"),
        ("oc", "s3://", None, "needs a bucket"),
    ],
)
def test_resolve_rejects_bad_paths_and_roots(home, monkeypatch, path, configured, env, match):
    if env is not None:
        monkeypatch.setenv(storage.STORAGE_ENV, env)
    with pytest.raises(ValueError, match=match):
        storage.resolve(path, configured)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("/data/runs/oc", "/data/runs/oc"),
        ("file:///data/runs/oc", "/data/runs/oc"),
        ("s3://bucket/morl/oc", "{home}/morl-runs/mirror/s3/bucket/morl/oc"),
        ("s3://bucket/morl/oc?region=eu-west-1", "{home}/morl-runs/mirror/s3/bucket/morl/oc"),
        ("gs://bucket/../oc", "{home}/morl-runs/mirror/gs/bucket/oc"),
    ],
)
def test_mirror(home, uri, expected):
    assert storage.mirror(uri) == expected.format(home=home)


def test_storage_root_default_and_env(home, monkeypatch):
    assert storage.storage_root() == str(home / "morl-runs")
    monkeypatch.setenv(storage.STORAGE_ENV, "")  # empty: unset
    assert storage.storage_root() == str(home / "morl-runs")
    monkeypatch.setenv(storage.STORAGE_ENV, "~/store")
    assert storage.storage_root() == str(home / "store")


# ------------------------------------------------------------------ filesystem
@pytest.mark.parametrize(
    "uri, fs_type, path",
    [
        ("/tmp/x/y.json", pafs.LocalFileSystem, "/tmp/x/y.json"),
        ("file:///tmp/x/y.json", pafs.LocalFileSystem, "/tmp/x/y.json"),
        ("~/x", pafs.LocalFileSystem, "{home}/x"),
    ],
)
def test_filesystem_local(home, uri, fs_type, path):
    fs, inner = storage.filesystem(uri)
    assert isinstance(fs, fs_type) and inner == path.format(home=home)


@pytest.mark.parametrize(
    "uri, match",
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("nosuchscheme://bucket/x", "no pyarrow file system"),
    ],
)
def test_filesystem_rejects_bad_locations(uri, match):
    with pytest.raises(ValueError, match=match):
        storage.filesystem(uri)


# ------------------------------------------------------------------ reads and writes, locally and on S3
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free localhost port, the AWS env pointing at it, and one bucket; yields the
    S3FileSystem a client would configure by hand."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**KEYS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(k, v)
        fs = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}",
            scheme="http",
            access_key=KEYS["AWS_ACCESS_KEY_ID"],
            secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
            region=KEYS["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        yield fs
    server.stop()


def round_trip(root: str) -> None:
    doc = {"deploy": True, "weights": [1.0, 2.5, 10.0], "λ": 0.25}
    table = pa.table({"user_id": [1, 2, 3], "reward": [0.5, 1.5, 2.5]})
    assert not storage.exists(storage.join(root, "run"))
    assert storage.list_dir(storage.join(root, "run")) == []
    storage.write_json(storage.join(root, "run", "decision.json"), doc)
    storage.write_parquet(table, storage.join(root, "run", "train", "part-0.parquet"))
    storage.write_bytes(storage.join(root, "run", "agent.pt"), b"\x00weights")
    storage.write_json(storage.join(root, "run", "decision.json"), {**doc, "deploy": False})  # replace
    assert storage.read_json(storage.join(root, "run", "decision.json")) == {**doc, "deploy": False}
    assert storage.read_parquet(storage.join(root, "run", "train")).equals(table)  # a folder of Parquet
    assert storage.read_parquet(storage.join(root, "run", "train", "part-0.parquet")).equals(table)
    assert storage.read_bytes(storage.join(root, "run", "agent.pt")) == b"\x00weights"
    assert storage.list_dir(storage.join(root, "run")) == ["agent.pt", "decision.json", "train"]
    assert storage.exists(storage.join(root, "run", "agent.pt"))
    with pytest.raises(FileNotFoundError, match="no file at"):
        storage.read_bytes(storage.join(root, "run", "missing.json"))


@pytest.mark.parametrize(
    "write, args, match",
    [
        (storage.write_bytes, (b"data", "{root}/x.bin"), r"write_bytes\(uri, data\): got \(bytes, str\)"),
        (storage.write_bytes, ("{root}/x.bin", "text"), r"got \(str, str\)"),
        (storage.write_json, ({"a": 1}, "{root}/x.json"), r"write_json\(uri, obj\): uri must be"),
        (storage.write_parquet, ("{root}/x.parquet", pa.table({"a": [1]})), r"write_parquet\(table, uri\)"),
    ],
)
def test_writers_reject_swapped_arguments(tmp_path, write, args, match):
    args = tuple(a.format(root=tmp_path) if isinstance(a, str) else a for a in args)
    with pytest.raises(TypeError, match=match):
        write(*args)
    assert os.listdir(tmp_path) == []


def test_local_round_trip_is_atomic(tmp_path):
    round_trip(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "run")) == ["agent.pt", "decision.json", "train"]  # no temporary files


def test_s3_round_trip(s3):
    root = f"s3://{BUCKET}/round-trip"
    round_trip(root)
    # what landed is real S3 objects, read back through a hand-configured client
    with s3.open_input_stream(f"{BUCKET}/round-trip/run/decision.json") as f:
        assert json.loads(f.read())["deploy"] is False
    fs, inner = storage.filesystem(f"{root}/run/agent.pt")
    assert isinstance(fs, pafs.S3FileSystem) and inner == f"{BUCKET}/round-trip/run/agent.pt"


def test_s3_write_is_one_put(s3, caplog):
    """The object appears whole or not at all: one PutObject, no multipart upload to leave half done."""
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs one line per request
    storage.write_json(f"s3://{BUCKET}/one-put/decision.json", {"deploy": True})
    requests = [r.getMessage() for r in caplog.records if "/one-put/" in r.getMessage()]
    assert len(requests) == 1 and f'"PUT /{BUCKET}/one-put/decision.json HTTP' in requests[0], requests


def test_copy_tree_and_local_copy_between_s3_and_disk(s3, home):
    storage.write_json(f"s3://{BUCKET}/tree/a/x.json", {"x": 1})
    storage.write_bytes(f"s3://{BUCKET}/tree/b.bin", b"b")
    local = storage.local_copy(f"s3://{BUCKET}/tree")
    assert local == str(home / "morl-runs" / "mirror" / "s3" / BUCKET / "tree")
    assert json.loads((home / "morl-runs/mirror/s3" / BUCKET / "tree/a/x.json").read_text()) == {"x": 1}
    storage.copy_tree(local, f"s3://{BUCKET}/tree-copy")
    assert storage.read_bytes(f"s3://{BUCKET}/tree-copy/b.bin") == b"b"
    with pytest.raises(FileNotFoundError, match="nothing at"):
        storage.copy_tree(f"s3://{BUCKET}/no-such-tree", str(home / "x"))


# ------------------------------------------------------------------ a training job's artifacts
def test_job_config_resolves_artifact_paths(home):
    job = JobConfig(checkpoint_dir="oc", storage="s3://bucket/morl")
    assert job.resolve_paths() == {"checkpoint_dir": "s3://bucket/morl/oc"}
    assert JobConfig(checkpoint_dir="oc").resolve_paths() == {"checkpoint_dir": str(home / "morl-runs" / "oc")}
    with pytest.raises(ValueError, match="relative path"):
        JobConfig(storage="runs").resolve_paths()


def run_job(tmp_path, config: dict, *extra: str) -> int:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return job_main(TrainJobConfig, build, progress, ["--config", str(path), *extra])


@pytest.mark.ray
def test_job_from_another_cwd_checkpoints_under_the_storage_root_and_resumes(
    ray_session, home, tmp_path, monkeypatch, capsys
):
    """The bug: a relative checkpoint_dir landed in the job's (temporary) cwd. Now it lands under
    $MORL_STORAGE, and a later run from yet another cwd resumes from there."""
    root = tmp_path / "store"
    monkeypatch.setenv(storage.STORAGE_ENV, str(root))
    for cwd in ("job-a", "job-b"):
        (tmp_path / cwd).mkdir()
    monkeypatch.chdir(tmp_path / "job-a")
    assert run_job(tmp_path, {**TINY_JOB, "checkpoint_dir": "oc"}) == 0
    out = capsys.readouterr().out
    assert f"artifacts → checkpoint_dir {root / 'oc'}" in out and "iter    2 |" in out
    assert storage.list_dir(str(root / "oc")) == ["iter_000001", "iter_000002", "tensorboard"]
    assert os.listdir(tmp_path / "job-a") == []  # nothing in the job's cwd
    monkeypatch.chdir(tmp_path / "job-b")
    assert run_job(tmp_path, {**TINY_JOB, "checkpoint_dir": "oc"}, "--resume", "latest", "--iterations", "1") == 0
    out = capsys.readouterr().out
    assert f"resumed from {root / 'oc' / 'iter_000002'} at iteration 2" in out and "iter    3 |" in out
    assert latest_checkpoint(str(root / "oc")) == str(root / "oc" / "iter_000003")
    assert os.listdir(tmp_path / "job-b") == []


@pytest.mark.ray
def test_job_checkpoints_to_s3_and_resumes_from_there(ray_session, s3, home, tmp_path, monkeypatch, capsys):
    """The job runner end to end on s3://: checkpoints there, TensorBoard in the local mirror, resume."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    config = {**TINY_JOB, "iterations": 1, "checkpoint_dir": "oc", "storage": f"s3://{BUCKET}/morl"}
    assert run_job(tmp_path, config) == 0
    out = capsys.readouterr().out
    uri = f"s3://{BUCKET}/morl/oc"
    assert f"artifacts → checkpoint_dir {uri}" in out and f"checkpoint {uri}/iter_000001" in out
    assert "TensorBoard writes local files only" in out
    assert latest_checkpoint(uri) == f"{uri}/iter_000001"
    assert "rllib_checkpoint.json" in storage.list_dir(f"{uri}/iter_000001")
    assert s3.get_file_info(f"{BUCKET}/morl/oc/iter_000001/rllib_checkpoint.json").is_file
    tensorboard = home / "morl-runs" / "mirror" / "s3" / BUCKET / "morl" / "oc" / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tensorboard))
    assert run_job(tmp_path, config, "--resume", "latest", "--iterations", "1") == 0
    out = capsys.readouterr().out
    assert f"resumed from {uri}/iter_000001 at iteration 1" in out and "iter    2 |" in out
    assert latest_checkpoint(uri) == f"{uri}/iter_000002"
    assert os.listdir(tmp_path / "cwd") == []


def learner_weights(algo) -> dict:
    return {k: np.array(v) for k, v in algo.learner_group.get_weights()["default_policy"].items()}


@pytest.mark.ray
@pytest.mark.parametrize(
    "where, num_env_runners",
    # s3 with an env runner is the other two cases combined (storage and env-runner restore are independent)
    [("s3", 0), pytest.param("s3", 1, marks=pytest.mark.slow), ("local", 1)],
)
def test_checkpoint_round_trip_restores_learner_and_env_runner_weights(
    ray_session, s3, home, tmp_path, where, num_env_runners
):
    """One RLlib checkpoint save + restore of the tiny outer controller through s3:// (and locally), with
    the EnvRunners, local or remote, acting with the restored weights right away."""
    runners = {"num_env_runners": num_env_runners, "num_envs_per_env_runner": 2}
    algo = build(TrainJobConfig(**{**TINY_JOB, "env_runners": runners}))
    restored = None
    root = f"s3://{BUCKET}/direct-{num_env_runners}" if where == "s3" else str(tmp_path)
    try:
        algo.train()
        uri = f"{root}/iter_000001"
        assert save_checkpoint(algo, uri) == uri
        restored = restore_checkpoint(uri)
        saved = learner_weights(algo)
        assert restored.iteration == 1 and saved.keys() == learner_weights(restored).keys()
        assert all(np.array_equal(saved[k], v) for k, v in learner_weights(restored).items())
        # the EnvRunners act with the restored weights, not fresh ones (RLlib syncs only local checkpoints)
        states = restored.env_runner_group.foreach_env_runner(
            lambda r: r.get_state(components="rl_module")["rl_module"], local_env_runner=num_env_runners == 0
        )
        assert len(states) == 1
        shared = [k for k in states[0] if k in saved]
        assert shared and all(np.array_equal(np.asarray(states[0][k]), saved[k]) for k in shared)
    finally:
        algo.stop()
        if restored is not None:
            restored.stop()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        restore_checkpoint(f"{root}/iter_000009")


@pytest.mark.ray
def test_a_checkpoint_written_without_its_learner_is_not_marked_complete(ray_session, tmp_path):
    """RLlib saves past a remote learner that dies while writing its state (it takes it out of service without
    raising): save_checkpoint raises LearnerLost and leaves no COMPLETE, so latest_checkpoint skips it."""
    algo = build(TrainJobConfig(**{**TINY_JOB, "learners": {"num_learners": 1}}))
    try:
        algo.train()
        save_checkpoint(algo, str(tmp_path / "iter_000001"))
        # the learner's process dies when asked to write its state (RLlib's same-node save ignores the result)
        die = lambda *args, **kwargs: os._exit(1)  # noqa: E731
        algo.learner_group.foreach_learner(lambda learner: setattr(learner, "save_to_path", die))
        with pytest.raises(LearnerLost, match="not marked"):
            save_checkpoint(algo, str(tmp_path / "iter_000002"))
        assert not (tmp_path / "iter_000002" / COMPLETE).exists()
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_000001")
    finally:
        algo.stop()


@pytest.mark.ray
def test_a_learner_that_raises_is_a_bug_and_a_killed_one_a_loss(ray_session):
    """RLlib takes a remote learner out of service for either; lost_worker pings it: alive is a bug (the job fails
    with it), dead is a lost worker (the job restores)."""
    import signal
    import time

    algo = build(TrainJobConfig(**{**TINY_JOB, "learners": {"num_learners": 1}}))
    try:
        results = list(algo.learner_group.foreach_learner(lambda learner: 1 / 0))
        assert not results[0].ok and len(learners_out_of_service(algo)) == 1  # out of service
        assert not lost_worker(IndexError("list index out of range"), algo)
        (pid,) = [r.get() for r in algo.learner_group.foreach_learner(lambda _: os.getpid(), healthy_only=False)]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not any(is_dead(a) for a in learners_out_of_service(algo)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lost_worker(IndexError("list index out of range"), algo)
    finally:
        algo.stop()


def test_latest_checkpoint_takes_the_newest_iteration_only(tmp_path):
    for name in ("iter_000002", "iter_000010", "iter_000009", "tensorboard", "iter_x", "iter_000011.tmp"):
        (tmp_path / "oc" / name).mkdir(parents=True)
        (tmp_path / "oc" / name / COMPLETE).write_bytes(b"")
    assert latest_checkpoint(str(tmp_path / "oc")) == str(tmp_path / "oc" / "iter_000010")
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_latest_checkpoint_skips_one_cut_short(tmp_path):
    """A checkpoint without COMPLETE (its writer or a learner died mid-save) is never resumed from, even when it is
    the only one (a learner lost during the first save)."""
    for name in ("iter_000002", "iter_000003", "iter_000004"):
        (tmp_path / "oc" / name).mkdir(parents=True)
    assert latest_checkpoint(str(tmp_path / "oc")) is None
    for name in ("iter_000002", "iter_000003"):
        (tmp_path / "oc" / name / COMPLETE).write_bytes(b"")
    assert latest_checkpoint(str(tmp_path / "oc")) == str(tmp_path / "oc" / "iter_000003")


# ------------------------------------------------------------------ the entrypoints' artifacts on S3
def run_module(module: str, cwd, env: dict, *args: str) -> str:
    """``python -m module …`` as a job's driver: its own environment (the object store's endpoint and
    credentials, as a job's runtime env sets them) and its own local Ray, whose workers inherit them."""
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.ray
@pytest.mark.slow  # 4–8 min: the S3 paths it uses are covered by the checkpoint and resume tests above
@pytest.mark.timeout(900)  # its own driver and local Ray (two Ray Data jobs) on top of the session's
def test_crm_job_keeps_events_rows_policy_and_decision_on_s3(s3, home, tmp_path):
    """Ray Data reads the request rows from the bucket in Ray's workers, so the job runs as its own driver
    (the test session's Ray started before the endpoint and credentials were in the environment)."""
    (tmp_path / "cwd").mkdir()
    config = {
        "storage": f"s3://{BUCKET}/crm-job",
        "env_config": TINY_JOB["env_config"],
        "sessions": 100,
        "iterations": 1,
        "checkpoint_every": 1,
        "num_cpus": 2,
        "crm": {"steps_per_iteration": 3},
    }
    (tmp_path / "crm.yaml").write_text(yaml.safe_dump(config))
    env = {
        **{k: os.environ[k] for k in (*KEYS, "AWS_ENDPOINT_URL")},
        "HOME": str(home),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="crm-", dir="/tmp"),  # short: Ray's socket paths < 108 chars
    }
    try:
        out = run_module("rllib_policies.train_crm", tmp_path / "cwd", env, "--config", str(tmp_path / "crm.yaml"))
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    run = f"s3://{BUCKET}/crm-job/crm"
    assert f"artifacts → checkpoint_dir {run}/checkpoints, out_dir {run}" in out and "iter    1 |" in out
    assert storage.list_dir(run) == ["checkpoints", "crm_policy.pt", "decision.json", "events", "train", "validation"]
    assert storage.list_dir(f"{run}/checkpoints") == ["iter_000001"]  # TensorBoard stays local
    decision = storage.read_json(f"{run}/decision.json")
    assert decision["policy"] == f"{run}/crm_policy.pt" and isinstance(decision["deploy"], bool)
    state = torch.load(io.BytesIO(storage.read_bytes(decision["policy"])), weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    rows = storage.read_parquet(f"{run}/train").num_rows + storage.read_parquet(f"{run}/validation").num_rows
    assert rows > 0 and storage.list_dir(f"{run}/events")
    assert os.listdir(tmp_path / "cwd") == []


@pytest.mark.ray
@pytest.mark.slow  # two job runs of minutes each
@pytest.mark.timeout(600)  # two job runs (fresh, then resumed on a node without the mirror)
def test_utility_agent_job_keeps_frontier_and_agent_on_s3_and_serving_loads_them(
    ray_session, s3, home, tmp_path, monkeypatch, capsys
):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv(storage.STORAGE_ENV, f"s3://{BUCKET}/ua-job")
    config = {
        "out_dir": "utility_agent",
        "env_config": TINY_JOB["env_config"],
        "grid_n": 3,
        "exploration_sessions": 150,
        "iterations": 1,
        "lambdas": 3,
        "eval_sessions": 0,
        "batch_size": 128,
        "hidden": 8,
    }
    (tmp_path / "ua.yaml").write_text(yaml.safe_dump(config))
    assert train_utility_agent(["--config", str(tmp_path / "ua.yaml")]) == 0
    out = capsys.readouterr().out
    run = f"s3://{BUCKET}/ua-job/utility_agent"
    assert json.dumps({"frontier": f"{run}/frontier.json", "agent": f"{run}/agent.pt"}) in out
    names = storage.list_dir(run)
    assert {"agent.pt", "frontier.json", "exploration.json", "events", "requests", "checkpoints"} <= set(names)
    assert "iter_000001" in storage.list_dir(f"{run}/checkpoints")
    frontier = storage.read_json(f"{run}/frontier.json")
    assert frontier["version"] == 1 and frontier["meta"]["agent"] == f"{run}/agent.pt"
    assert frontier["meta"]["config"]["out_dir"] == run
    # serving: a relative agent path resolves under $MORL_STORAGE, a URI is fetched to its local mirror
    module = load_agent(storage.local_copy(storage.resolve("utility_agent/agent.pt")))
    assert len(module.grid) == 9
    # a later submission on another node (no local mirror): the request rows come back from the bucket
    shutil.rmtree(home / "morl-runs")
    assert train_utility_agent(["--config", str(tmp_path / "ua.yaml"), "--resume", "latest", "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run}/checkpoints/iter_000001 at iteration 1" in out and "iter    2 |" in out
    assert storage.read_json(f"{run}/frontier.json")["version"] == 2
    assert os.listdir(tmp_path / "cwd") == []
