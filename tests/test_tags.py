"""``tags``: extra MLflow tags, set as conf/config.yaml documents it (``tags.purpose=baseline``, no ``+``);
the node stays open while the rest of the config stays closed (hydra_plugins/lora_sweep_tags.py)."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException


def test_the_documented_tags_override_reaches_the_mlflow_run(compose, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    from lora_sweep.run import run

    cfg = compose(*tiny_overrides, "train.max_steps=2", "tags.purpose=baseline", "+tags.owner=me")
    assert cfg.tags == {"purpose": "baseline", "owner": "me"}
    record = run(cfg)
    tags = (
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        .get_run(record.mlflow["run_id"])
        .data.tags
    )
    assert tags["purpose"] == "baseline" and tags["owner"] == "me"


def test_a_tag_can_be_set_twice_and_the_rest_of_the_config_stays_closed(compose):
    cfg = compose("model=local", "model.name_or_path=/x", "tags.purpose=a", "tags.purpose=b")
    assert cfg.tags == {"purpose": "b"}
    with pytest.raises(ConfigCompositionException, match="Could not override 'train.lrr'"):
        compose("train.lrr=1")
