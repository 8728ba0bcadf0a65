"""Every --method of ``hwmpq search`` resolves to its strategy's config, and each config has a strategy."""

import pytest

from hwmpq.search.base import _STRATEGIES
from hwmpq.search.loop import LoopConfig, method_config


@pytest.mark.parametrize("method,config_name", [("dnas", "DNASConfig"), ("ssps", "SSPSConfig"),
                                                 ("saq", "SAQConfig"), ("nemo", "NEMOConfig"),
                                                 ("ilp", "ILPConfig"), ("uniform", "UniformConfig")])
def test_method_resolves_to_registered_strategy(method, config_name, tmp_path):
    cfg = LoopConfig(method=method, out=str(tmp_path / "plan.json"), search={"epochs": 2})
    config = method_config(cfg, method)
    assert type(config).__name__ == config_name
    assert type(config) in _STRATEGIES


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use dnas, ssps, saq, nemo, ilp or uniform"):
        method_config(LoopConfig(method="bogus", out=str(tmp_path / "p.json")), "bogus")
