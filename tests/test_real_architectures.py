"""Smoke runs of the lab's and the baseline methods at their papers' architectures, through `clbench run`.

Each test runs one method end to end through the command line (`clbench.cli.main(["run", ...])`) at the
network its paper uses -- ViT-B/16 (depth 12, width 768, 12 heads, MLP 3072, timm's weights layout) for the
pre-trained-model methods, Mammoth's CIFAR ResNet-18 (3x3 stride-1 stem, nf 64) for the others -- on
data written by the test in the real on-disk formats:

- a CIFAR-100 python-pickle fixture (`cifar-100-python/{train,test,meta}`, 32x32 random images, three train and
  one test image per class), split into two experiences of 50 classes (`cifar100-2`, the PyCIL/PILOT
  CIFAR-100 builder with two increments, registered for this module only);
- an ImageNet-R fixture (`imagenet-r/<wnid>/*.jpg`, the 200 real wnids, two JPEGs of 64-100 px per class,
  resized by the loader), split into two experiences of 100 classes (`imagenet-r-2`).

Pretrained weights go through `--pretrained` and the Hugging Face hub cache as in tests/test_weights.py: one
random-weight ViT-B/16 checkpoint (330 MB in float32) is written once per module and hard-linked under both
tags the methods use (`augreg_in21k`, PrePrompt's `orig_in21k`). Every run trains two steps per experience
(`limit_train_batches=2`, batch 2) and scores four test images per experience (`limit_eval_samples=4`).
The ViT runs at 32 px (2x2 patches + [CLS] = 5 tokens, position embeddings resampled by the loader), the
ResNets at CIFAR's own 32 px: the depth, width and weights layout are the real ones.

Each test checks that the run completes, that its parameter count (`total_params` of the per-experience
record) is the published architecture's -- ViT-B/16: 85,798,656 without head at 224 px (86,567,656 with
the 1000-class head), here less the position embeddings of the 192 patches a 32 px input does not have;
CIFAR ResNet-18: 11,168,832 without head (11,173,962 with the 10-class head) -- plus the method's own
parameters computed by hand from its Config, and that its inference FLOPs per image
(`fwd_flops_per_sample`) match the count derived here from the layer shapes within 1%, under the
profiler's convention (one multiply-accumulate = 2 FLOPs; matmuls, convolutions and attention counted;
bias, normalisation, elementwise ops not).

All tests are marked slow; run them with
`pytest -q -n 0 -p no:randomly tests/test_real_architectures.py`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

REVISION = "0123456789abcdef0123456789abcdef01234567"
VIT_TAGS = ("vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224.orig_in21k")
IMAGE = 32  # ViT input side in these runs

# ViT-B/16 (Dosovitskiy et al. 2021, table 1)
DEPTH, WIDTH, HEADS, MLP, PATCH = 12, 768, 12, 3072, 16


# --------------------------------------------------------------------------- analytic counts
def vit_tokens(image: int = IMAGE) -> int:
    return (image // PATCH) ** 2 + 1


def vit_params(image: int = IMAGE) -> int:
    """ViT-B/16 without head: patch embedding, [CLS], position embeddings, 12 blocks, final norm."""
    D = WIDTH
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * MLP + MLP) + (MLP * D + D)
    return (3 * PATCH * PATCH * D + D) + D + vit_tokens(image) * D + DEPTH * block + 2 * D


def test_vit_b16_parameter_count_is_the_published_one():
    assert vit_params(224) == 85_798_656
    assert vit_params(224) + WIDTH * 1000 + 1000 == 86_567_656  # timm's vit_base_patch16_224 (1000 classes)


def vit_flops(tokens: int | None = None, image: int = IMAGE, prefix: dict[int, int] | None = None,
              adapter: int = 0) -> int:
    """One forward pass of ViT-B/16 per image: patch embedding, per block QKV, attention (QK^T and AV),
    projection and MLP; `tokens` counts the prompt tokens prepended to the input; `prefix` maps a block
    to the number of prefix keys (= values) its attention gets; `adapter`: an AdaptFormer bottleneck in
    every block (down and up projections)."""
    D, patches = WIDTH, (image // PATCH) ** 2
    n = tokens if tokens is not None else patches + 1
    total = 2 * patches * 3 * PATCH * PATCH * D
    for b in range(DEPTH):
        keys = n + (prefix or {}).get(b, 0)
        total += 2 * n * D * 3 * D + 2 * n * keys * D * 2 + 2 * n * D * D + 2 * n * D * MLP * 2
        total += 2 * n * 2 * D * adapter
    return total


# CIFAR ResNet-18 (Mammoth): (in, out, kernel, output side) of every convolution at 32x32 input
def resnet18_cifar_convs(nf: int = 64, side: int = 32) -> list[tuple[int, int, int, int]]:
    convs = [(3, nf, 3, side)]
    cin = nf
    for stage, stride in enumerate((1, 2, 2, 2)):
        cout = nf * 2 ** stage
        side //= stride
        for block in range(2):
            convs += [(cin, cout, 3, side), (cout, cout, 3, side)]
            if block == 0 and (stride != 1 or cin != cout):
                convs.append((cin, cout, 1, side))  # 1x1 projection shortcut
            cin = cout
    return convs


def resnet18_cifar_params(nf: int = 64) -> int:
    """Convolutions (no bias) and batch norms (weight, bias), no head."""
    return sum(i * o * k * k + 2 * o for i, o, k, _ in resnet18_cifar_convs(nf))


def resnet18_cifar_flops(nf: int = 64) -> int:
    return sum(2 * i * o * k * k * s * s for i, o, k, s in resnet18_cifar_convs(nf))


def test_cifar_resnet18_parameter_count_is_the_published_one():
    assert resnet18_cifar_params() == 11_168_832
    assert resnet18_cifar_params() + 512 * 10 + 10 == 11_173_962  # Mammoth's 11.17M on Seq-CIFAR-10


def linear(i: int, o: int) -> int:
    return i * o + o


# --------------------------------------------------------------------------- fixtures in the real formats
def write_vit_b16_checkpoint(cache: Path) -> None:
    """A random ViT-B/16 checkpoint in timm's layout, stored once and linked under both tags."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for value in state.values():  # not timm's init: a load that kept the init would differ
        value.uniform_(-0.05, 0.05)
    first = None
    for name in VIT_TAGS:
        repo = cache / f"models--timm--{name}"
        snapshot = repo / "snapshots" / REVISION
        snapshot.mkdir(parents=True)
        if first is None:
            first = snapshot / "model.safetensors"
            save_file(state, str(first))
        else:
            os.link(first, snapshot / "model.safetensors")
        (snapshot / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)


def write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 3), ("test", 1)):  # 300 training images: ER-style buffers of 200 fill
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.randint(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)  # channel-major rows
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * len(labels), b"batch_label": split.encode(), b"fine_labels": labels,
                         b"coarse_labels": [c // 5 for c in labels], b"data": data}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
                     b"coarse_label_names": [f"super{c}".encode() for c in range(20)]}, f, protocol=2)


def write_imagenet_r(root: Path) -> None:
    from importlib.resources import files

    from PIL import Image

    wnids = files("timm.data").joinpath("_info/imagenet_r_synsets.txt").read_text().split()
    rng = np.random.RandomState(0)
    for w in wnids:
        for k in range(2):
            side = int(rng.randint(64, 101))
            path = root / "imagenet-r" / w / f"art_{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (side, side + 7, 3), dtype=np.uint8)).save(path, format="JPEG")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The hub cache with ViT-B/16 (both tags), the CIFAR-100 and ImageNet-R fixtures, two-experience
    splits of both registered for this module only."""
    from clbench.registry import SCENARIOS
    from clbench.scenarios import cifar, imagenet_r
    from clbench.scenarios._images import image_folder_scenario
    from clbench.scenarios.base import data_root, seeded_permutation, split_increments

    root = tmp_path_factory.mktemp("real")
    write_vit_b16_checkpoint(root / "hub")
    write_cifar100(root / "data")
    write_imagenet_r(root / "data")

    def cifar100_2(options):
        """CIFAR-100 in 2 experiences of 50 classes (test only)."""
        return cifar._cifar100("cifar100-2", split_increments(100, 2), options)

    def imagenet_r_2(options):
        """ImageNet-R in 2 experiences of 100 classes (test only)."""
        root = data_root(options) / imagenet_r.FOLDER
        train, test, wnids, layout = imagenet_r.read(root, how="write the fixture")
        return image_folder_scenario("imagenet-r-2", options, imagenet_r.PILOT, train, test,
                                     increments=split_increments(200, 2), class_names=wnids,
                                     paper_order=seeded_permutation(200, 1993), meta={"source": layout})

    SCENARIOS._load()
    added = {"cifar100-2": cifar100_2, "imagenet-r-2": imagenet_r_2}
    SCENARIOS._entries.update(added)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root
    for name in added:
        SCENARIOS._entries.pop(name, None)


def run_cli(env: Path, strategy: str, scenario: str = "cifar100-2", pretrained: bool = True, *extra: str) -> dict:
    from clbench.cli import main

    out = env / "results" / f"{strategy}-{scenario}"
    args = ["run", "--strategy", strategy, "--scenario", scenario, "--data-root", str(env / "data"),
            "--output-dir", str(out), "--quiet", "--epochs", "1", "--batch-size", "2",
            "--set", "limit_train_batches=2", "limit_eval_samples=4", "checkpoint=false", "progress=false", *extra]
    if pretrained:
        args += ["--pretrained", "--set", f"image_size={IMAGE}"]
    assert main(args) == 0
    (path,) = out.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "completed"
    assert len(result["accuracy_matrix"]) == 2 and len(result["edge"]["per_experience"]) == 2
    return result


def check(result: dict, params: list[int], flops: list[int]) -> None:
    """Per experience: `total_params` exactly, `fwd_flops_per_sample` within 1%."""
    records = result["edge"]["per_experience"]
    assert [r["total_params"] for r in records] == params
    for r, expected in zip(records, flops):
        assert r["fwd_flops_per_sample"] == pytest.approx(expected, rel=0.01), (r["fwd_flops_per_sample"], expected)


def config(strategy: str):
    from clbench.registry import STRATEGIES

    return STRATEGIES.get(strategy).Config()


SEEN = (50, 100)  # classes seen after each experience of cifar100-2
D = WIDTH


# --------------------------------------------------------------------------- ViT-B/16 methods
def test_simplecil(env):
    """Frozen ViT; cosine classifier over class-mean prototypes (buffers, not parameters)."""
    check(run_cli(env, "simplecil"), [vit_params()] * 2, [vit_flops() + 2 * D * 100] * 2)


def test_simplecil_on_imagenet_r(env):
    """The ImageNet-R fixture (64-100 px JPEGs, resized by the loader to 32 px): 200 prototypes."""
    result = run_cli(env, "simplecil", "imagenet-r-2")
    check(result, [vit_params()] * 2, [vit_flops() + 2 * D * 200] * 2)


def test_l2p(env):
    """Pool of M prompts of L tokens with M keys; a query pass, then a pass with top-N prompts prepended."""
    c = config("l2p")
    own = c.pool_size * c.prompt_length * D + c.pool_size * D
    prompted = vit_tokens() + c.top_k * c.prompt_length
    check(run_cli(env, "l2p"), [vit_params() + own + linear(D, n) for n in SEEN],
          [vit_flops() + vit_flops(prompted) + 2 * D * (n + c.pool_size) for n in SEEN])


def test_dualprompt(env):
    """G-prompts (key and value prefixes) in blocks (0, 1), a pool of E-prompts in blocks (2, 3, 4) with keys."""
    c = config("dualprompt")
    g = len(c.g_prompt_layers) * 2 * c.g_prompt_length * D
    e = c.pool_size * (len(c.e_prompt_layers) * 2 * c.e_prompt_length * D + D)
    prefix = {**{b: c.g_prompt_length for b in c.g_prompt_layers}, **{b: c.e_prompt_length for b in c.e_prompt_layers}}
    check(run_cli(env, "dualprompt"), [vit_params() + g + e + linear(D, n) for n in SEEN],
          [vit_flops() + vit_flops(prefix=prefix) + 2 * D * (n + c.pool_size) for n in SEEN])


def test_coda_prompt(env):
    """Per prompted block M components: a prompt of 2L tokens (L key, L value prefixes), a key and an attention vector."""
    c = config("coda_prompt")
    own = c.prompt_blocks * c.pool_size * (2 * c.prompt_length + 2) * D
    prefix = {b: c.prompt_length for b in range(c.prompt_blocks)}
    used = [c.pool_size * (i + 1) // 2 for i in range(2)]  # components of the tasks seen (M / T per task)
    check(run_cli(env, "coda_prompt"), [vit_params() + own + linear(D, n) for n in SEEN],
          [vit_flops() + vit_flops(prefix=prefix) + c.prompt_blocks * m * 2 * (2 * c.prompt_length + 2) * D + 2 * D * n
           for m, n in zip(used, SEEN)])


def adapter_params(bottleneck: int) -> int:
    """AdaptFormer in every block: down D -> r and up r -> D, with biases."""
    return DEPTH * (linear(D, bottleneck) + linear(bottleneck, D))


def test_aper(env):
    """Adapter tuned on the first task; features [pre-trained; adapted] (2 passes) against 100 prototypes of 2D."""
    c = config("aper")
    check(run_cli(env, "aper"), [vit_params() + adapter_params(c.bottleneck)] * 2,
          [vit_flops() + vit_flops(adapter=c.bottleneck) + 2 * 2 * D * 100] * 2)


def test_ease(env):
    """One adapter in training plus the expert module that runs finished tasks' adapters (stored as vectors,
    not counted in `total_params`); inference: one adapted pass per task seen, cosine over the t*D concatenation."""
    c = config("ease")
    check(run_cli(env, "ease"), [vit_params() + 2 * adapter_params(c.bottleneck)] * 2,
          [t * vit_flops(adapter=c.bottleneck) + 2 * t * D * 100 for t in (1, 2)])


def test_limit_eval_samples_scores_the_first_samples_only(tmp_path):
    """`limit_eval_samples=3`: every accuracy is a multiple of 1/3."""
    from clbench.cli import main

    assert main(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--output-dir", str(tmp_path), "--quiet",
                 "--epochs", "1", "--set", "limit_train_batches=1", "limit_eval_samples=3", "checkpoint=false"]) == 0
    (path,) = tmp_path.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["run_config"]["limit_eval_samples"] == 3
    for row in result["accuracy_matrix"]:
        for value in row:
            assert round(value * 3, 6) == round(value * 3)


# --------------------------------------------------------------------------- CIFAR ResNet-18 methods
@pytest.mark.parametrize("strategy", ["der_pp", "er_ace"])
def test_rehearsal_baselines_at_cifar_resnet18(env, strategy):
    """Mammoth's CIFAR ResNet-18 from scratch with a linear head over the classes seen."""
    check(run_cli(env, strategy, "cifar100-2", False), [resnet18_cifar_params() + linear(512, n) for n in SEEN],
          [resnet18_cifar_flops() + 2 * 512 * n for n in SEEN])
