"""The Serve config launcher: ingress key validation and the builder's argument checks."""

import pytest
import yaml

from serve_apps.inner_reward import app_builder
from serve_apps.launch import INGRESS_ENV, load_config


def test_ingress_key_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ingress": "nginx", "applications": [{"import_path": "x:y"}]}))
    with pytest.raises(ValueError, match="ingress must be one of"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"applications": []}))
    with pytest.raises(ValueError, match="non-empty 'applications'"):
        load_config(str(path))
    assert INGRESS_ENV["haproxy"] == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_builder_rejects_unknown_and_bad_args():
    with pytest.raises(ValueError, match="unknown inner-reward args: \\['max_slate'\\]"):
        app_builder({"max_slate": 3})
    with pytest.raises(ValueError, match="max_slate_size must be >= 1"):
        app_builder({"max_slate_size": 0})
    with pytest.raises(ValueError, match="clip_lo"):
        app_builder({"initial_weights": {"clip_lo": 2, "clip_hi": 1}})
