"""Pretrained weights like datasets: the hub cache read offline, --download with a short timeout, bad tags.

Every test points the Hugging Face hub cache at a tmp dir and writes a random-weight checkpoint of a real
timm architecture in the layout the hub client reads (`models--timm--<name>/snapshots/<rev>/model.safetensors`
and `refs/main`); nothing here reaches the network.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clbench.cli import main
from clbench.errors import UsageError
from clbench.models.backbones import build_backbone, check_backbone_name, pretrained_file, weights_source

TAGGED = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # a real timm tag (1000-class head), 5.7M parameters
REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_hub_checkpoint(cache: Path, name: str = TAGGED) -> dict[str, torch.Tensor]:
    """A random checkpoint of `name` at its real size, stored as the hub client caches `timm/<name>`."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model(name, pretrained=False)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for value in state.values():  # not timm's init: a load that silently kept the init would differ
        value.uniform_(-1, 1)
    repo = cache / f"models--timm--{name}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text('{"architecture": "%s"}' % name.split(".")[0])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return state


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any request the code made would fail
    return cache


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hub_cache_weights_load_offline_and_equal_the_written_ones(hub_cache, no_network):
    written = write_hub_checkpoint(hub_cache)
    vit = build_backbone(TAGGED, pretrained=True, img_size=224)
    loaded = vit.state_dict()
    assert set(loaded) == {k for k in written if not k.startswith("head.")}  # num_classes=0: no classifier
    for key, value in loaded.items():
        assert torch.equal(value, written[key]), key


def test_hub_weights_at_a_reduced_input_size_resample_only_the_positions(hub_cache, no_network):
    written = write_hub_checkpoint(hub_cache)
    vit = build_backbone(TAGGED, pretrained=True, img_size=32)  # 2x2 patches of 16
    loaded = vit.state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 4, 192)
    for key, value in loaded.items():
        if key != "pos_embed":
            assert torch.equal(value, written[key]), key
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 192)


def test_missing_weights_are_one_line_naming_the_repo_and_the_ways_to_get_them(hub_cache, no_network):
    with pytest.raises(UsageError) as e:
        build_backbone("vit_base_patch16_224.augreg_in21k", pretrained=True)
    text = str(e.value)
    assert "\n" not in text
    assert "timm/vit_base_patch16_224.augreg_in21k (model.safetensors)" in text
    assert str(hub_cache) in text and "--download" in text and "--weights FILE" in text


def test_an_architecture_without_tag_uses_timms_default_tag():
    src = weights_source("vit_tiny_patch16_224")
    assert src.model == TAGGED and src.hub_repo == f"timm/{TAGGED}"


def test_download_without_network_fails_in_seconds_naming_the_url(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(UsageError) as e:
        pretrained_file("vit_base_patch16_224.augreg_in21k", download=True)
    assert time.perf_counter() - start < 5
    text = str(e.value)
    assert "\n" not in text
    assert "http://127.0.0.1:9/timm/vit_base_patch16_224.augreg_in21k/resolve/main/model.safetensors" in text


def test_download_under_hf_hub_offline_says_so(hub_cache):
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        pretrained_file("vit_base_patch16_224.augreg_in21k", download=True)


def test_download_finds_weights_already_cached_without_the_network(hub_cache, no_network):
    write_hub_checkpoint(hub_cache)
    path = pretrained_file(TAGGED, download=True)
    assert path.endswith("model.safetensors") and str(hub_cache) in path


@pytest.mark.parametrize("name, close", [
    ("vit_base_patch16_224.in21k", "vit_base_patch16_224.augreg_in21k"),
    ("vit_base_patch16_224.augreg_in21", "vit_base_patch16_224.augreg_in21k"),
    ("vit_base_patch16_224.orig_in21", "vit_base_patch16_224.orig_in21k"),
    ("vit_bse_patch16_224", "vit_base_patch16_224"),
])
def test_a_tag_or_name_timm_does_not_know_lists_the_close_ones(name, close):
    with pytest.raises(UsageError) as e:
        check_backbone_name(name)
    assert close in str(e.value) and "\n" not in str(e.value)


def test_bad_tag_on_the_command_line_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, hub_cache):
    out = tmp_path / "results"
    code = main(["run", "--strategy", "l2p", "--scenario", "digits32-5", "--backbone", "vit_base_patch16_224.in21k",
                 "--output-dir", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "vit_base_patch16_224.augreg_in21k" in err
    assert not out.exists()


def test_a_strategy_refusing_the_backbone_names_what_it_accepts(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["run", "--strategy", "l2p", "--scenario", "digits32-5", "--backbone", "resnet18_cifar_nf8",
                 "--output-dir", str(out), "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Vision Transformer" in err and "clbench_vit_tiny" in err
    assert not list(out.rglob("*.json")) if out.exists() else True


def test_weights_file_implies_pretrained(tmp_path):
    from clbench.cli import build_parser, spec_from_args

    file = tmp_path / "w.pt"
    torch.save({}, file)
    args = build_parser().parse_args(["run", "--strategy", "naive", "--weights", str(file)])
    spec = spec_from_args(args, 0)
    assert spec.run.pretrained and spec.run.weights == str(file)
    assert spec.run_given["pretrained"] == "flag"


def test_a_run_with_hub_weights_completes_offline_and_records_them(tmp_path, hub_cache, no_network, fast_config_for):
    from clbench.engine.runner import RunSpec, run

    write_hub_checkpoint(hub_cache)
    spec = RunSpec("simplecil", "digits32-5",
                   run=fast_config_for(tmp_path, backbone=TAGGED, pretrained=True))
    result = run(spec)
    assert result.status == "completed" and result.backbone == TAGGED and result.pretrained
    assert result.run_config["backbone"] == TAGGED
    assert result.settings_source["run_config"]["backbone"] == "run spec"
    assert result.settings_source["run_config"]["pretrained"] == "run spec"


def test_clbench_download_fetches_what_the_run_needs_and_says_where(hub_cache, no_network, capsys):
    write_hub_checkpoint(hub_cache)
    code = main(["download", "--strategy", "simplecil", "--scenario", "digits32-5", "--backbone", TAGGED, "--pretrained"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"weights: {TAGGED} -> {hub_cache}" in out and "model.safetensors" in out
    assert "data: digits32-5 ready (5 experiences)" in out


def test_clbench_download_of_missing_weights_without_network_is_one_line(hub_cache, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code = main(["download", "--strategy", "preprompt", "--scenario", "cifar100-10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "http://127.0.0.1:9/timm/vit_base_patch16_224.orig_in21k/resolve/main/model.safetensors" in err[0]
