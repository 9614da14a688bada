"""Deformable DETR (Hugging Face transformers) as the DETR family's detector: parameter count
against the published R50 model, per-layer outputs, prompts in the decoder self-attention's
keys and values, weight loading, the base rules, and P2IOD / fine-tuning through the runner on
a VOC-format fixture (random weights)."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

import clbench.models.detection.deformable_detr as dd  # noqa: E402
from clbench.errors import UsageError  # noqa: E402
from clbench.strategies._detr import base_problem  # noqa: E402

SMALL = dict(encoder_layers=1, decoder_layers=2, backbone="resnet18")  # mechanics tests only


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return dd.DeformableDETR(5, num_queries=10, **SMALL).eval()


def _spy_attention(monkeypatch):
    """Every decoder self-attention call's keys and values (after their projections and any prompt)."""
    seen = []
    original = dd.attend

    def spy(query, key, value, *args):
        seen.append((query.shape[2], key.detach().clone(), value.detach().clone()))
        return original(query, key, value, *args)

    monkeypatch.setattr(dd, "attend", spy)
    return seen


# --------------------------------------------------------------------------- size
def test_real_size_parameter_count_matches_the_published_deformable_detr_r50():
    """Zhu et al. (ICLR 2021), Table 1: Deformable DETR (R50, single stage, no refinement) has 40M
    parameters. Built at full size with random weights (timm ResNet-50, nothing downloaded)."""
    torch.manual_seed(0)
    model = dd.DeformableDETR(91)  # COCO's 91 label ids, as the released checkpoint's head
    assert dd.parameter_count(model) == 40_069_665
    assert abs(dd.parameter_count(model) - dd.PUBLISHED_PARAMETERS) / dd.PUBLISHED_PARAMETERS < 0.002
    parts = {"backbone": model.backbone, "encoder": model.hf.model.encoder, "decoder": model.hf.model.decoder,
             "input_proj": model.hf.model.input_proj, "class_head": model.class_head, "box_head": model.box_head}
    counts = {k: dd.parameter_count(m) for k, m in parts.items()}
    assert counts == {"backbone": 23_454_912, "encoder": 4_541_184, "decoder": 6_123_264, "input_proj": 5_639_168,
                      "class_head": 23_387, "box_head": 132_612}
    # a VOC stream's head: 20 rows instead of 91
    assert dd.parameter_count(model) - 71 * (256 + 1) == 40_051_418
    cfg = model.hf.config
    assert (cfg.num_queries, cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.num_feature_levels,
            cfg.two_stage, cfg.with_box_refine) == (300, 6, 6, 256, 4, False, False)
    # one class head and one box head shared by all six decoder layers
    assert all(m.weight is model.class_head.weight for m in model.hf.class_embed)


# --------------------------------------------------------------------------- outputs and prompts
def test_per_layer_outputs_end_in_the_models_own_predictions_and_encoder_runs_once(small, monkeypatch):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = small.hf(pixel_values=(x - small.mean) / small.std)
        calls = []
        handle = small.hf.model.encoder.register_forward_hook(lambda m, a, o: calls.append(1))
        encoded = small.encode(x)
        first, again = small.decode(*encoded), small.decode(*encoded)
        handle.remove()
    assert first.logits.shape == (2, 2, 10, 5) and first.boxes.shape == (2, 2, 10, 4) and first.states.shape == (2, 2, 10, 256)
    assert torch.allclose(first.logits[-1], reference.logits, atol=1e-5)
    assert torch.allclose(first.boxes[-1], reference.pred_boxes, atol=1e-6)
    assert len(calls) == 1 and torch.equal(first.states, again.states)  # the second decode reused the encoder output
    assert "forward" not in vars(small.backbone)  # the cached backbone call is undone


def test_prompts_are_prepended_to_the_self_attention_keys_and_values_only(small, monkeypatch):
    seen = _spy_attention(monkeypatch)
    B, P, d, heads = 2, 3, 256, 8
    torch.manual_seed(1)
    prompts = [(torch.randn(B, P, d), torch.randn(B, P, d)) for _ in range(small.decoder_layers)]
    with torch.no_grad():
        encoded = small.encode(torch.rand(B, 3, 64, 64))
        free = small.decode(*encoded)
        prompted = small.decode(*encoded, prompts=prompts)
    assert [k.shape[2] for _, k, _ in seen] == [10, 10, 10 + P, 10 + P]  # free pass, then prompted pass
    assert all(q == 10 for q, _, _ in seen)  # queries are not extended
    for l, (keys, values) in enumerate(prompts):
        _, k, v = seen[2 + l]
        assert torch.equal(k[:, :, :P], keys.view(B, P, heads, -1).transpose(1, 2))
        assert torch.equal(v[:, :, :P], values.view(B, P, heads, -1).transpose(1, 2))
        assert torch.equal(k[:, :, P:], seen[l][1]) or l > 0  # layer 0's own keys are the prompt-free ones
    assert not torch.allclose(free.states[-1], prompted.states[-1])
    assert all(getattr(m, dd._PROMPT) is None for m in small.self_attentions())  # cleared after the pass


# --------------------------------------------------------------------------- weights and bases
def test_weights_load_from_a_folder_or_a_file_except_the_class_head(small, tmp_path):
    small.hf.save_pretrained(tmp_path / "folder")
    torch.save(small.hf.state_dict(), tmp_path / "weights.pt")
    for source in (tmp_path / "folder", tmp_path / "weights.pt"):
        torch.manual_seed(5)
        other = dd.DeformableDETR(5, num_queries=10, **SMALL)
        head = {k: v.clone() for k, v in other.class_head.state_dict().items()}
        dd.load_deformable_detr_weights(other, str(source))
        for key, value in small.state_dict().items():
            if "class_embed" in key:
                assert torch.equal(other.state_dict()[key], head[key.rsplit(".", 1)[-1]]), key
            else:
                assert torch.equal(other.state_dict()[key], value), key


def test_missing_weights_are_one_clear_error_naming_the_file(small, monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="nowhere.safetensors"):
        dd.load_deformable_detr_weights(small, str(tmp_path / "nowhere.safetensors"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(UsageError, match=r"SenseTime/deformable-detr model\.safetensors.*--download.*clbench download"):
        dd.load_deformable_detr_weights(small, "coco")


def test_bases_refused_where_they_do_not_fit():
    assert "20-class stream (voc-*, coco-*)" in base_problem("tiny", "shapes-pretrain", 20)
    assert base_problem("tiny", "shapes-pretrain", 4) is None and base_problem("tiny", "shapes-pretrain", 8) is None
    assert "TinyDETR base" in base_problem("deformable_detr", "shapes-pretrain", 4)
    assert "all 80 COCO classes" in base_problem("deformable_detr", "coco", 80)
    assert base_problem("deformable_detr", "coco", 20) is None
    assert "expected detector=deformable_detr" in base_problem("tiny", "coco", 20)
    from clbench.engine.runner import resolve, RunSpec
    from clbench.strategies.p2iod import P2IOD

    with pytest.raises(UsageError, match=r"shapes-pretrain.*20-class stream"):
        P2IOD(None, 20, seed=0)
    _, cfg = resolve(RunSpec("p2iod", "voc-10+10", paper_settings=True))
    assert (cfg.detector, cfg.base, cfg.num_queries, cfg.prompt_length) == ("deformable_detr", "coco", 300, 10)
    run_cfg, cfg = resolve(RunSpec("cl_detr", "coco-40+40", paper_settings=True))
    assert (cfg.detector, cfg.base, run_cfg.batch_size, run_cfg.epochs) == ("deformable_detr", "imagenet", 8, 50)


def test_missing_transformers_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"pip install 'clbench\[detr\]'"):
        dd.require_transformers()


# --------------------------------------------------------------------------- end to end
STAND_INS = ["aeroplane", "bus", "dog", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # shape -> VOC class


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    from clbench.scenarios._iod_files import write_voc
    from clbench.scenarios.shapes import generate_shapes

    root = tmp_path_factory.mktemp("voc")
    write_voc(generate_shapes(16, size=64, seed=0), root / "VOCdevkit", "trainval", STAND_INS)
    write_voc(generate_shapes(6, size=64, seed=1), root / "VOCdevkit", "test", STAND_INS, first_id=1000)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["p2iod", "detr_finetune"])
def test_runs_on_a_voc_fixture_with_prompts_in_the_decoder_and_old_rows_fixed(strategy, voc_root, tmp_path, monkeypatch):
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    seen = _spy_attention(monkeypatch)
    rows = {}

    def snapshot(i, result, s):
        rows[i] = (s.detector.class_head.weight.detach().clone(), s.detector.class_head.bias.detach().clone())
        rows["decoder"] = s.detector.decoder_layers

    cfg = RunConfig(epochs=1, batch_size=2, eval_batch_size=4, limit_train_batches=2, accelerator="cpu",
                    image_size=128, data_root=str(voc_root), output_dir=str(tmp_path), checkpoint=False,
                    profile=False, progress=False)
    overrides = {"detector": "deformable_detr", "base": "random", "num_queries": 20, "freeze_old_rows": True}
    result = run(RunSpec(strategy, "voc-10+10", run=cfg, strategy_overrides=overrides), on_experience=snapshot)
    assert result.status == "completed" and len(result.detection["per_task"]) == 2
    old = list(range(10))  # voc-10+10: task 2's old classes
    assert torch.equal(rows[0][0][old], rows[1][0][old]) and torch.equal(rows[0][1][old], rows[1][1][old])
    assert not torch.equal(rows[0][0][10:], rows[1][0][10:])  # the current rows did learn
    key_lengths = {k.shape[2] for _, k, _ in seen}
    if strategy == "p2iod":
        assert key_lengths == {20, 20 + 2}  # prompt-free passes, prompted passes (prompt_length 4: 2 key tokens)
        assert sum(k.shape[2] == 22 for _, k, _ in seen) % rows["decoder"] == 0
    else:
        assert key_lengths == {20}


@pytest.mark.slow
def test_cl_detr_trains_deformable_detr_with_its_teacher_and_parameter_groups():
    from clbench.scenarios.shapes import generate_shapes
    from clbench.strategies.cl_detr import CLDETR, Config

    from clbench.datasets import detection_collate
    from clbench.types import ExperienceInfo

    strategy = CLDETR(None, 4, Config(detector="deformable_detr", base="random", num_queries=10), seed=0)
    task2 = ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)
    strategy.on_experience_start(ExperienceInfo(0, (0, 1), (0, 1), 2, 4))
    strategy.on_experience_start(task2)  # task 2: a frozen teacher of the model as task 1 left it
    backbone = dict(strategy.detector.backbone.named_parameters())
    assert not backbone["model.conv1.weight"].requires_grad and not backbone["model.layer1.0.conv1.weight"].requires_grad
    assert backbone["model.layer2.0.conv1.weight"].requires_grad and backbone["model.layer4.0.conv1.weight"].requires_grad
    groups = strategy.parameter_groups()
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 1e-4, pytest.approx(1e-4)]  # rest, box, backbone, offsets x0.1
    named = {id(p): n for n, p in strategy.detector.named_parameters()}
    assert groups[3]["params"] and all("reference_points" in named[id(p)] or "sampling_offsets" in named[id(p)]
                                       for p in groups[3]["params"])
    strategy.phase = strategy.phases(task2)[0]
    batch = detection_collate([generate_shapes(2, size=64, num_classes=4, seed=3)[i] for i in range(2)])
    losses = strategy.step_losses(batch)
    assert set(losses) == {"focal", "l1", "giou"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert strategy.detector.hf.model.decoder.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in strategy.teacher.parameters())
