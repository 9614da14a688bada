"""CLFD's published settings pad the code-domain crop with black on the scenarios they name (a zero pad would be mid-grey after normalisation):
their `pad_pixel` is what a zero intensity becomes under the scenario's own normalisation."""

from __future__ import annotations

import pytest
import torch
from clbench.scenarios.base import ScenarioOptions

from clbench.engine.runner import strategy_config
from clbench.registry import SCENARIOS

VARIANTS = ("clfd", "er_clfd", "der_pp_clfd", "er_ace_clfd", "cls_er_clfd")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, fixtures):
    root = tmp_path_factory.mktemp("data")
    fixtures.write_cifar10(root)
    fixtures.write_tinyimagenet(root)
    return root


@pytest.mark.parametrize("scenario_name", ["cifar10-5", "tinyimagenet-10"])
def test_paper_settings_pad_with_the_scenarios_black_pixel(data_root, scenario_name):
    scenario = SCENARIOS.get(scenario_name)(ScenarioOptions(data_root=str(data_root)))
    black = (torch.zeros(3) - torch.tensor(scenario.mean)) / torch.tensor(scenario.std)
    for name in VARIANTS:
        pad = strategy_config(name, paper_settings_for=scenario_name).pad_pixel
        assert torch.allclose(torch.tensor(pad), black, atol=1e-5), (name, pad, black)
