"""The KubeRay manifests embed Serve configs that Ray's own schema accepts and our builders build."""

import glob
import importlib
import os

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "cluster", "*.yaml")))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "serve_apps", "configs", "*.yaml")))


def serve_configs():
    for path in MANIFESTS:
        doc = yaml.safe_load(open(path))
        if doc.get("kind") == "RayService":
            yield path, yaml.safe_load(doc["spec"]["serveConfigV2"])
    for path in CONFIGS:
        yield path, yaml.safe_load(open(path))


@pytest.mark.parametrize(
    "path, config", list(serve_configs()), ids=lambda x: os.path.basename(x) if isinstance(x, str) else ""
)
def test_serve_config_is_valid_and_builds(path, config):
    schema = (
        ServeDeploySchema.model_validate(config)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(config)
    )
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        built = builder(app.args)
        assert built is not None
        known = {"InnerRewardService", "RecommendService", "Stage_matching", "Stage_pre_ranking", "Stage_ranking"}
        for dep in app.deployments or []:
            assert dep.name in known, f"{path}: unknown deployment {dep.name}"


def test_rayservice_autoscales_and_sets_the_ingress():
    doc = yaml.safe_load(open(os.path.join(ROOT, "cluster", "rayservice-inner-reward.yaml")))
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] < group["maxReplicas"]
    env = {e["name"]: e["value"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
