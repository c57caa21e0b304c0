"""Every shipped config parses: the run sections, the adapter, and the data schema."""

from pathlib import Path

import pytest

from asymlora.data import MixtureConfig
from asymlora.train.config import adapter_config, load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    config = load_run_config(path)
    adapter_config(config, ["a", "b", "c"])
    MixtureConfig.from_dict(config.data)


def test_overrides_reach_nested_keys(tmp_path):
    config = load_run_config(CONFIGS[0], ["train.max_steps=7", "adapter.r=16", "model.dtype=float32"])
    assert config.train.max_steps == 7 and config.adapter["r"] == 16 and config.model.dtype == "float32"
