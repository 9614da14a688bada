"""DualPrompt: faithfulness checks (frozen backbone; the G-prompt prefix-tuned into
blocks 0-1 and E-prompts into blocks 2-4; task t trains E-prompt t and pulls its key to the
query; per-sample top-1 key match at inference; masking to the current classes)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from clbench.strategies.dualprompt import DualPrompt

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    paper_settings,
    run,
    strategy_config,
)
from clbench.errors import UsageError
from clbench.models.backbones import build_backbone
from clbench.types import Batch

TINY = {"pool_size": 5, "g_prompt_length": 2, "e_prompt_length": 2, "e_prompt_layers": (2, 3)}


def _vit(seed: int = 0, depth: int = 4):
    torch.manual_seed(seed)
    if depth == 4:
        return build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
    return timm.create_model("clbench_vit_tiny", num_classes=0, depth=depth)


def _strategy(experiences: int = 1, depth: int = 4, **overrides):
    scenario = create_scenario("digits32-5")
    cfg = strategy_config("dualprompt", {**TINY, **overrides})
    strategy = create_strategy("dualprompt", _vit(depth=depth), 10, cfg, seed=0)
    for i in range(experiences):
        strategy.on_experience_start(scenario.info(i))
    return strategy, scenario


class _Prefixes:
    """The prefix each prompted block's attention receives, per forward."""

    def __init__(self, strategy):
        self.calls: list[dict[int, torch.Tensor]] = []
        self.handles = []
        router = strategy.router
        for b in range(router.blocks):
            attn = strategy.backbone.blocks[b].attn
            self.handles.append(attn.register_forward_pre_hook(
                lambda m, a, b=b: self._note(b, router.prefix)))

    def _note(self, block, prefix):
        if prefix is None:
            return
        if block == 0:
            self.calls.append({})
        self.calls[-1][block] = prefix[block].detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def _hand_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


# --------------------------------------------------------------------------- placement and selection
def test_g_prompt_in_blocks_0_1_and_per_sample_top1_e_prompt_in_blocks_2_4():
    """The paper's layout on a 5-block ViT with the default layers; a 4-sample batch whose samples
    match different keys."""
    strategy, scenario = _strategy(depth=5, e_prompt_layers=(2, 3, 4))
    assert strategy.cfg.g_prompt_layers == (0, 1) and DualPrompt.Config().e_prompt_layers == (2, 3, 4)
    x = torch.cat([scenario.test_sets[i].x[:1] for i in range(4)])
    strategy.eval()
    q = strategy.query(x)
    assert torch.equal(q, _vit(depth=5).eval()(x))  # the frozen ViT's own [CLS], no prompt
    with torch.no_grad():  # key j = sample j's centred query (key 4 the opposite of sample 0's)
        centred = q - q.mean(0)
        strategy.e_pool.keys.copy_(torch.cat([centred, -centred[:1]]))
    hand = [max(range(5), key=lambda i: _hand_cos(q[b], strategy.e_pool.keys[i].detach())) for b in range(4)]
    assert len(set(hand)) > 1  # the samples pick different E-prompts
    seen = _Prefixes(strategy)
    with torch.no_grad():
        logits = strategy.predict_logits(x)
    seen.remove()
    (prefix,) = seen.calls  # the query pass runs without prefixes
    g, e = strategy.g_prompt.detach(), strategy.e_pool.prompts.detach()
    for block in (0, 1):  # (key/value, batch, length, heads, head_dim): the shared G-prompt for every sample
        assert prefix[block].shape == (2, 4, 2, 4, 16)
        assert all(torch.equal(prefix[block][:, b], g[block]) for b in range(4))
    for j, block in enumerate((2, 3, 4)):  # each sample's own E-prompt: key half as key prefix, value half as value
        for b in range(4):
            assert torch.equal(prefix[block][0, b], e[hand[b], j, 0]) and torch.equal(prefix[block][1, b], e[hand[b], j, 1])
    with torch.no_grad():  # per sample: the batch does not decide a sample's prompt
        alone = torch.cat([strategy.predict_logits(x[b : b + 1]) for b in range(4)])
    assert torch.allclose(logits, alone, atol=1e-5)


def test_task_t_trains_its_own_e_prompt_pulls_its_key_and_masks_to_its_classes():
    strategy, scenario = _strategy(experiences=3)  # task 2: classes 4, 5 of seen 0..5
    strategy.train()
    data = scenario.train_sets[2]
    x, y = data.x[:8], data.y[:8]
    seen = _Prefixes(strategy)
    losses = strategy.step_losses(Batch(x, y))
    seen.remove()
    (prefix,) = seen.calls
    e = strategy.e_pool.prompts.detach()
    for j, block in enumerate((2, 3)):  # E-prompt 2 for every sample, whatever its key match
        assert all(torch.equal(prefix[block][:, b], e[2, j]) for b in range(8))
    q = strategy.query(x)
    k2 = strategy.e_pool.keys.detach()[2]
    hand_pull = sum(1 - _hand_cos(q[b], k2) for b in range(8)) / 8
    assert strategy.cfg.pull_weight == 0.1
    assert losses["pull"].item() == pytest.approx(0.1 * hand_pull, rel=1e-5)
    with torch.no_grad():
        with strategy.router.using(strategy.prefix(torch.full((8,), 2))):
            logits = strategy.head(strategy.backbone(x))  # the prompted [CLS]
    current = logits[:, [4, 5]]
    hand_ce = -(current.gather(1, (y - 4).unsqueeze(1)).squeeze(1) - torch.logsumexp(current, dim=1)).mean()
    assert losses["ce"].item() == pytest.approx(hand_ce.item(), rel=1e-5)
    (losses["ce"] + losses["pull"]).backward()
    others = [0, 1, 3, 4]
    assert strategy.e_pool.prompts.grad[2].abs().sum() > 0 and torch.all(strategy.e_pool.prompts.grad[others] == 0)
    assert strategy.e_pool.keys.grad[2].abs().sum() > 0 and torch.all(strategy.e_pool.keys.grad[others] == 0)
    assert strategy.g_prompt.grad.abs().sum() > 0
    grad = strategy.head.fc.weight.grad
    assert torch.all(grad[:4] == 0) and grad[[4, 5]].abs().sum() > 0
    assert all(p.grad is None for p in strategy.backbone.parameters())


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def dualprompt_run(tmp_path_factory, fast_config_for, fit_snapshots):
    snaps = fit_snapshots(lambda m: {"backbone": m.backbone.state_dict(), "e": m.e_pool.prompts, "keys": m.e_pool.keys,
                                     "g": m.g_prompt, "head": m.head.fc.weight})
    cfg = fast_config_for(tmp_path_factory.mktemp("dualprompt"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    result = run(RunSpec("dualprompt", "digits32-5", run=cfg, seed=0, strategy_overrides=TINY), callbacks=[snaps])
    assert result.status == "completed", result.error
    return result, snaps.at


def test_a_short_run_trains_task_ts_e_prompt_and_key_only_and_never_the_backbone(dualprompt_run):
    result, at = dualprompt_run
    assert len(result.accuracy_matrix) == 5 and all(len(row) == 5 for row in result.accuracy_matrix)
    initial = _vit().state_dict()
    for t in range(5):
        start, end = at[(t, "start")], at[(t, "end")]
        for snap in (start, end):
            assert all(torch.equal(snap["backbone"][k], initial[k]) for k in initial)
        others = [s for s in range(5) if s != t]
        assert not torch.equal(start["e"][t], end["e"][t]) and torch.equal(start["e"][others], end["e"][others])
        assert not torch.equal(start["keys"][t], end["keys"][t]) and torch.equal(start["keys"][others], end["keys"][others])
        assert not torch.equal(start["g"], end["g"])  # the G-prompt trains in every task
        assert torch.equal(start["head"][: 2 * t], end["head"][: 2 * t])  # old classes' rows: masked, unchanged
        if t > 0:  # E-prompt t starts as E-prompt t-1 left task t-1; its key is not copied
            assert torch.equal(start["e"][t], at[(t - 1, "end")]["e"][t - 1])
            assert torch.equal(start["keys"][t], at[(0, "start")]["keys"][t])
    # the diagnostic: per seen test experience, the share whose key match picks its own task's E-prompt
    rows = [d["e_prompt_selection_accuracy"] for d in result.diagnostics]
    assert [len(r) for r in rows] == [1, 2, 3, 4, 5] and all(0.0 <= a <= 1.0 for r in rows for a in r)


def test_selection_accuracy_on_hand_set_selections():
    from clbench.datasets import InMemoryDataset, make_loader

    strategy, scenario = _strategy(experiences=2)
    strategy.on_experience_end(scenario.info(1), scenario.train_sets[1])
    x = scenario.test_sets[0].x[:4]
    loaders = [make_loader(InMemoryDataset(x, torch.tensor([0, 1, 0, 1])), 4, shuffle=False),
               make_loader(InMemoryDataset(x[:2], torch.tensor([2, 3])), 4, shuffle=False)]
    picks = iter([torch.tensor([0, 0, 1, 0]), torch.tensor([1, 3])])
    strategy.select = lambda q: next(picks)
    strategy.eval()
    with torch.no_grad():
        for loader in loaders:
            for batch in loader:
                strategy(batch.x)
    assert strategy.diagnose(scenario.info(1), loaders, torch.device("cpu")) == {"e_prompt_selection_accuracy": [0.75, 0.5]}


def test_usage_errors_non_vit_exit_2_layers_that_do_not_fit_and_overlap(tmp_path, capsys):
    from clbench.cli import main

    code = main(["run", "--strategy", "dualprompt", "--scenario", "digits-5", "--backbone", "clbench_mlp",
                 "--accelerator", "cpu", "--quiet", "--output-dir", str(tmp_path)])
    assert code == 2 and "no ViT blocks" in capsys.readouterr().err
    expected = r"do not fit a ViT of depth 4; expected block indices 0 to 3 \(e.g. --set e_prompt_layers=2,3\)"
    with pytest.raises(UsageError, match=expected):
        create_strategy("dualprompt", _vit(), 10, strategy_config("dualprompt", {}), seed=0)  # the default 2-4
    with pytest.raises(UsageError, match="overlap"):
        strategy_config("dualprompt", {"g_prompt_layers": (0, 1), "e_prompt_layers": (1, 2)})
    from clbench.config import split_overrides

    assert split_overrides({"e_prompt_layers": "2,3"}, DualPrompt.Config, "--set")[1] == {"e_prompt_layers": (2, 3)}


def test_defaults_and_paper_settings_are_pilots():
    cfg = DualPrompt.Config()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule) == ("adam", 0.001, 0.0, "constant")
    assert (cfg.g_prompt_length, cfg.e_prompt_length, cfg.pool_size, cfg.pull_weight) == (5, 5, 10, 0.1)
    assert paper_settings(DualPrompt, "cifar100-10")[0] == {"class_order": "paper", "epochs": 5, "batch_size": 24, "global_batch_size": 24}
    assert paper_settings(DualPrompt, "imagenet-r-10")[0] == {"class_order": "paper", "epochs": 10, "batch_size": 24, "global_batch_size": 24}
