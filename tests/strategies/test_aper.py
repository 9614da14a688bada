"""APER: adapter tuned in the first task only, then frozen; prototypes over [pre-trained; adapted] features."""

from __future__ import annotations

import pytest
import torch

from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.errors import UsageError


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def aper_run(tmp_path_factory, fast_config_for):
    snapshots = []

    def keep(i, result, strategy):
        snapshots.append({"backbone": _state(strategy.backbone), "adapters": _state(strategy.adaptation.adapters),
                          "prototypes": strategy.prototypes.clone(), "strategy": strategy})

    cfg = fast_config_for(tmp_path_factory.mktemp("aper"), backbone="clbench_vit_tiny", epochs=2, limit_train_batches=None)
    result = run(RunSpec("aper", "digits32-5", run=cfg, seed=0, strategy_overrides={"bottleneck": 8}), on_experience=keep)
    assert result.status == "completed", result.error
    return result, snapshots


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_never_changes_and_the_adapter_changes_in_the_first_task_only(aper_run):
    from clbench.models.adapters import AdapterSet
    from clbench.models.backbones import build_backbone

    result, snapshots = aper_run
    torch.manual_seed(0)
    initial = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
    assert _same(snapshots[0]["backbone"], _state(initial))  # the run builds the backbone from seed 0
    assert all(_same(s["backbone"], snapshots[0]["backbone"]) for s in snapshots[1:])
    fresh_up = AdapterSet.for_vit(initial, 8)[0].up.weight
    assert torch.all(fresh_up == 0) and snapshots[0]["adapters"]["adapters.0.up.weight"].abs().sum() > 0  # it was tuned
    assert all(_same(s["adapters"], snapshots[0]["adapters"]) for s in snapshots[1:])  # and frozen afterwards
    assert result.edge["per_experience"][0]["flops_step_shapes"][0]["phase"] == "adapt"
    assert {s["phase"] for r in result.edge["per_experience"][1:] for s in r["flops_step_shapes"]} == {"prototypes"}


def test_prototypes_are_means_of_the_2d_concatenated_embedding(aper_run):
    _, snapshots = aper_run
    strategy = snapshots[-1]["strategy"]
    d = strategy.backbone.num_features
    assert strategy.prototypes.shape == (10, 2 * d)
    scenario = create_scenario("digits32-5")
    for i, train_set in enumerate(scenario.train_sets):
        x, y = train_set.x, train_set.y
        phi = strategy.embed(x).double()
        strategy.backbone.eval()
        with torch.no_grad():
            assert torch.allclose(phi[:, :d].float(), strategy.backbone(x), atol=1e-5)  # first half: the plain model
        for c in y.unique().tolist():
            assert torch.allclose(strategy.prototypes[c], phi[y == c].mean(0).float(), atol=1e-5), (i, c)
            assert torch.equal(snapshots[i]["prototypes"][c], strategy.prototypes[c])  # computed once, in its own task


def test_aper_without_a_vit_backbone_is_a_usage_error(tmp_path, fast_config_for):
    with pytest.raises(UsageError, match="no ViT blocks"):
        run(RunSpec("aper", "digits-5", run=fast_config_for(tmp_path, backbone="clbench_mlp"), seed=0))
