"""L2P: faithfulness checks (frozen backbone, per-sample top-k cosine selection by the
unprompted [CLS] query, the 0.1-weighted key-query term, masking to the current classes) and the
input-level prompting it runs on."""

from __future__ import annotations

import math

import pytest
import torch
from clbench.strategies.l2p import L2P

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
from clbench.models.prompts import PromptPool, TokenPrompter
from clbench.types import Batch

TINY = {"pool_size": 5, "prompt_length": 2, "top_k": 2}


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)


def _strategy(experiences: int = 1, **overrides):
    scenario = create_scenario("digits32-5")
    strategy = create_strategy("l2p", _vit(), 10, strategy_config("l2p", {**TINY, **overrides}), seed=0)
    for i in range(experiences):
        strategy.on_experience_start(scenario.info(i))
    return strategy, scenario


def _hand_top_k(q: torch.Tensor, keys: torch.Tensor, k: int) -> list[list[int]]:
    """Top-k keys by cosine, sample by sample, in float64 with explicit norms."""
    q, keys = q.double(), keys.double()
    picks = []
    for qb in q:
        cosines = [float(qb @ key) / (math.sqrt(float(qb @ qb)) * math.sqrt(float(key @ key))) for key in keys]
        picks.append(sorted(range(len(keys)), key=lambda i: -cosines[i])[:k])
    return picks


def _hand_pull(q: torch.Tensor, keys: torch.Tensor, picks: list[list[int]]) -> float:
    """mean_b sum_{i in picks[b]} (1 - cos(q_b, k_i))."""
    q, keys = q.double(), keys.double()
    total = 0.0
    for qb, chosen in zip(q, picks):
        for i in chosen:
            total += 1 - float(qb @ keys[i]) / (float(qb.norm()) * float(keys[i].norm()))
    return total / len(picks)


# --------------------------------------------------------------------------- mechanics
def test_pool_selection_is_per_sample_top_k_cosine_on_a_hand_example():
    pool = PromptPool(4, (1, 2), key_dim=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
    q = torch.tensor([[2.0, 0.1], [-0.1, -3.0]])
    # sample 0 ~ (1, 0.05): cosines 0.9988, 0.0499, -0.9988, 0.7415 -> keys 0, 3
    # sample 1 ~ (-0.033, -1): cosines -0.0333, -0.9994, 0.0333, -0.7303 -> keys 2, 0
    assert pool.select(q, 2).tolist() == [[0, 3], [2, 0]]  # per sample, not one choice for the batch
    cos = {(0, 0): 2 / math.sqrt(4.01), (0, 3): 2.1 / (math.sqrt(4.01) * math.sqrt(2)),
           (1, 2): 0.1 / math.sqrt(9.01), (1, 0): -0.1 / math.sqrt(9.01)}
    expected = ((1 - cos[0, 0]) + (1 - cos[0, 3]) + (1 - cos[1, 2]) + (1 - cos[1, 0])) / 2
    pull = pool.pull(q, pool.select(q, 2))
    assert pull.item() == pytest.approx(expected, abs=1e-6)
    pull.backward()  # the term trains the selected keys only; the prompts get nothing from it
    assert pool.keys.grad[1].abs().sum() == 0 and pool.keys.grad[[0, 2, 3]].abs().sum() > 0
    assert pool.prompts.grad is None


def test_token_prompter_inserts_tokens_after_cls_with_the_cls_position_by_hand():
    vit = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit.forward_features(x)
    prompter = TokenPrompter(vit)
    tokens = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), plain)  # inactive: timm's ViT as it was
        with prompter.using(tokens):
            out = vit.forward_features(x)
        # by hand: [CLS + pos_0, prompt tokens + pos_0, patches + pos_1..16] -> blocks -> norm
        patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        cls = vit.cls_token + vit.pos_embed[:, :1]
        seq = torch.cat([cls.expand(2, -1, -1), tokens + vit.pos_embed[:, :1], patches], dim=1)
        expected = vit.norm(vit.blocks(seq))
    assert prompter.offset == 1 and out.shape == (2, 1 + 3 + 16, 64)
    assert torch.allclose(out, expected, atol=1e-5)


# --------------------------------------------------------------------------- the strategy's rules
def test_query_is_the_frozen_unprompted_cls_and_selection_is_hand_top_k_per_sample():
    strategy, scenario = _strategy()
    x = torch.cat([scenario.test_sets[i].x[:2] for i in range(5)])  # 10 images of 10 classes
    reference = _vit().eval()  # the same weights, never prompted
    strategy.train()  # the query is taken in eval mode whatever the strategy's mode
    with torch.no_grad():
        q = strategy.query(x)
        assert torch.equal(q, reference(x))
        strategy.pool.prompts.add_(1.0)  # prompts do not enter the query
        assert torch.equal(strategy.query(x), q)
        # keys pointing at individual samples' centred queries: the samples choose differently
        keys = strategy.pool.keys
        keys.copy_(q[[0, 2, 4, 6, 8]] - q.mean(0))
    picks = _hand_top_k(q, keys.detach(), 2)
    assert len({tuple(p) for p in picks}) > 1
    seen_tokens = []
    hook = strategy.backbone.norm_pre.register_forward_hook(lambda m, a, o: seen_tokens.append(strategy.prompter.tokens))
    strategy.eval()
    with torch.no_grad():
        batch_logits = strategy.predict_logits(x)
    hook.remove()
    tokens = [t for t in seen_tokens if t is not None]  # the query pass has none, the prompted pass has them
    assert len(tokens) == 1
    assert torch.equal(tokens[0], strategy.pool.prompts[torch.tensor(picks)].flatten(1, 2))
    with torch.no_grad():  # per sample: a sample's prediction does not depend on its batch
        alone = torch.cat([strategy.predict_logits(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(batch_logits, alone, atol=1e-5)


def test_loss_is_ce_masked_to_current_classes_plus_lambda_times_the_key_query_term():
    strategy, scenario = _strategy(experiences=2)  # task 1: classes 2, 3 of seen 0..3
    assert strategy.cfg.pull_weight == 0.1  # PILOT's lambda is the default
    strategy.train()
    data = scenario.train_sets[1]
    x, y = data.x[:8], data.y[:8]
    losses = strategy.step_losses(Batch(x, y))
    assert set(losses) == {"ce", "pull"}
    q = strategy.query(x)
    picks = _hand_top_k(q, strategy.pool.keys.detach(), 2)
    assert losses["pull"].item() == pytest.approx(0.1 * _hand_pull(q, strategy.pool.keys.detach(), picks), rel=1e-5)
    with torch.no_grad():
        # features: the mean of the 2 x 2 prompt tokens' outputs (tokens 1..4 after [CLS])
        with strategy.prompter.using(strategy.pool.prompts[torch.tensor(picks)].flatten(1, 2)):
            tokens_out = strategy.backbone.forward_features(x)
        logits = strategy.head(tokens_out[:, 1:5].mean(1))
    assert logits.shape[1] == 4
    current = logits[:, [2, 3]]
    hand_ce = -(current.gather(1, (y - 2).unsqueeze(1)).squeeze(1) - torch.logsumexp(current, dim=1)).mean()
    assert losses["ce"].item() == pytest.approx(hand_ce.item(), rel=1e-5)
    (losses["ce"] + losses["pull"]).backward()
    grad = strategy.head.fc.weight.grad
    assert torch.all(grad[[0, 1]] == 0) and grad[[2, 3]].abs().sum() > 0  # masked: old classes get nothing
    used = sorted({i for p in picks for i in p})
    unused = [i for i in range(5) if i not in used]
    assert strategy.pool.prompts.grad[used].abs().sum() > 0 and strategy.pool.keys.grad[used].abs().sum() > 0
    assert torch.all(strategy.pool.prompts.grad[unused] == 0) and torch.all(strategy.pool.keys.grad[unused] == 0)
    assert all(p.grad is None for p in strategy.backbone.parameters())


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def l2p_run(tmp_path_factory, fast_config_for, fit_snapshots):
    snaps = fit_snapshots(lambda m: {"backbone": m.backbone.state_dict(), "prompts": m.pool.prompts, "keys": m.pool.keys,
                                     "head": m.head.fc.weight})
    cfg = fast_config_for(tmp_path_factory.mktemp("l2p"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    result = run(RunSpec("l2p", "digits32-5", run=cfg, seed=0, strategy_overrides=TINY), callbacks=[snaps])
    assert result.status == "completed", result.error
    return result, snaps.at


def test_a_short_run_trains_prompts_keys_and_head_and_never_the_backbone(l2p_run):
    result, at = l2p_run
    assert len(result.accuracy_matrix) == 5 and all(len(row) == 5 for row in result.accuracy_matrix)
    initial = _vit().state_dict()  # the run builds the backbone from seed 0
    for t in range(5):
        for when in ("start", "end"):
            backbone = at[(t, when)]["backbone"]
            assert backbone.keys() == initial.keys() and all(torch.equal(backbone[k], initial[k]) for k in initial)
        start, end = at[(t, "start")], at[(t, "end")]
        assert not torch.equal(start["prompts"], end["prompts"]) and not torch.equal(start["keys"], end["keys"])
        rows = slice(2 * t, 2 * t + 2)
        assert not torch.equal(start["head"][rows], end["head"][rows])
        assert torch.equal(start["head"][: 2 * t], end["head"][: 2 * t])  # old classes' rows: masked, unchanged


def test_a_non_vit_backbone_is_a_usage_error_exit_2(tmp_path, capsys):
    from clbench.cli import main

    # digits-5's own default for l2p is a tiny ViT: an MLP asked for by name is refused
    code = main(["run", "--strategy", "l2p", "--scenario", "digits-5", "--backbone", "clbench_mlp", "--accelerator", "cpu",
                 "--quiet", "--output-dir", str(tmp_path)])
    assert code == 2 and "no ViT blocks" in capsys.readouterr().err


def test_config_checks_and_paper_settings():
    with pytest.raises(UsageError, match="top_k=6 is invalid; expected at most pool_size"):
        strategy_config("l2p", {"pool_size": 5, "top_k": 6})
    defaults = L2P.Config()
    assert (defaults.pool_size, defaults.prompt_length, defaults.top_k, defaults.optimizer) == (10, 5, 5, "adam")
    assert defaults.lr == pytest.approx(0.001875) and defaults.lr_schedule == "constant"
    run_cfg, cfg = paper_settings(L2P, "cifar100-10")
    assert run_cfg == {"class_order": "paper", "epochs": 5, "batch_size": 16, "global_batch_size": 16} and cfg["lr"] == pytest.approx(0.001875)
    assert paper_settings(L2P, "imagenet-r-10")[0] == {"class_order": "paper", "epochs": 10, "batch_size": 32, "global_batch_size": 32}
