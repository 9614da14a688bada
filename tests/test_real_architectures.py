"""Smoke runs of the lab's and the baseline methods at their papers' architectures, through `clbench run`.

Each test runs one method end to end through the command line (`clbench.cli.main(["run", ...])`) at the
network its defaults pick -- ViT-B/16 (depth 12, width 768, 12 heads, MLP 3072, timm's weights layout) for the
pre-trained-model methods (SimpleCIL, L2P, DualPrompt, CODA-Prompt, APER, EASE, RanPAC, PrePrompt, TUNA, DAF,
SGDS, SAEF), Mammoth's CIFAR ResNet-18 (3x3 stride-1 stem, nf 64) for the others (DER++, ER-ACE, iCaRL, LwF,
EWC, CLS-ER, CLFD, eTag, LoRD; FDINet: its own two ResNet-18 branches of width 21) -- on data written by
the test in the real on-disk formats:

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
parameters computed by hand from its Config (values a method keeps outside its parameters and runs at
inference, `stored_state()`, count; a frozen teacher copy, training only, does not), and that its inference
FLOPs per image (`fwd_flops_per_sample`) match the count derived here from the layer shapes within 1%, under
the profiler's convention (one multiply-accumulate = 2 FLOPs; matmuls, convolutions and attention counted;
bias, normalisation, elementwise ops not). Where a method's training has long phases that do not change the
network (classifier alignment, Fisher passes, generator epochs), a test shortens them with `--set` and
says so; RanPAC runs at a smaller projection (see its test).

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
def basic_stage(cin: int, cout: int, stride: int, side: int, blocks: int = 2,
                inner: int | None = None) -> list[tuple[int, int, int, int]]:
    """A stage of basic blocks (two 3x3 convolutions each, the first to `inner` channels, default cout; a
    1x1 projection shortcut in the first block when it changes the stride or the width); `side` is the
    stage's input side."""
    side //= stride
    mid = inner or cout
    convs = []
    for block in range(blocks):
        convs += [(cin, mid, 3, side), (mid, cout, 3, side)]
        if block == 0 and (stride != 1 or cin != cout):
            convs.append((cin, cout, 1, side))
        cin = cout
    return convs


def resnet18_cifar_convs(nf: int = 64, side: int = 32, in_chans: int = 3, widths: tuple[int, ...] | None = None,
                         inner: int | None = None) -> list[tuple[int, int, int, int]]:
    """3x3 stride-1 stem, four stages of two blocks (strides 1, 2, 2, 2); `widths`: the stages' channels
    (default nf, 2nf, 4nf, 8nf; the stem has the first stage's); `inner`: every block's inner width
    (default its stage's)."""
    widths = widths or tuple(nf * 2**stage for stage in range(4))
    convs = [(in_chans, widths[0], 3, side)]
    cin = widths[0]
    for cout, stride in zip(widths, (1, 2, 2, 2)):
        convs += basic_stage(cin, cout, stride, side, inner=inner)
        side //= stride
        cin = cout
    return convs


def conv_params(convs) -> int:
    """Convolutions (no bias) and their batch norms (weight, bias)."""
    return sum(i * o * k * k + 2 * o for i, o, k, _ in convs)


def conv_flops(convs) -> int:
    return sum(2 * i * o * k * k * s * s for i, o, k, s in convs)


def resnet18_cifar_params(nf: int = 64, in_chans: int = 3) -> int:
    """Convolutions (no bias) and batch norms (weight, bias), no head."""
    return conv_params(resnet18_cifar_convs(nf, in_chans=in_chans))


def resnet18_cifar_flops(nf: int = 64, side: int = 32, in_chans: int = 3) -> int:
    return conv_flops(resnet18_cifar_convs(nf, side, in_chans))


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
    """Frozen ViT; cosine classifier over class-mean prototypes (buffers of all 100 classes x D, counted
    through `stored_state`)."""
    check(run_cli(env, "simplecil"), [vit_params() + 100 * D] * 2, [vit_flops() + 2 * D * 100] * 2)


def test_simplecil_on_imagenet_r(env):
    """The ImageNet-R fixture (64-100 px JPEGs, resized by the loader to 32 px): 200 prototypes."""
    result = run_cli(env, "simplecil", "imagenet-r-2")
    check(result, [vit_params() + 200 * D] * 2, [vit_flops() + 2 * D * 200] * 2)


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
    """Adapter tuned on the first task; features [pre-trained; adapted] (2 passes) against 100 prototypes of 2D
    (counted through `stored_state`)."""
    c = config("aper")
    check(run_cli(env, "aper"), [vit_params() + adapter_params(c.bottleneck) + 100 * 2 * D] * 2,
          [vit_flops() + vit_flops(adapter=c.bottleneck) + 2 * 2 * D * 100] * 2)


def test_ease(env):
    """One adapter in training, the expert module that runs finished tasks' adapters, and the t finished
    adapters themselves and the prototypes of all 100 classes in each of the t subspaces (stored as vectors
    and a t x 100 x D buffer, counted through `stored_state`); inference: one adapted pass per task seen,
    cosine over the t*D concatenation."""
    c = config("ease")
    check(run_cli(env, "ease"), [vit_params() + (2 + t) * adapter_params(c.bottleneck) + t * 100 * D for t in (1, 2)],
          [t * vit_flops(adapter=c.bottleneck) + 2 * t * D * 100 for t in (1, 2)])


def test_ranpac(env):
    """First-task adapter, then h = ReLU(f W) with a fixed random W (D x M) and the ridge readout (M x C, all
    classes), both counted through `stored_state`. M = 1,000 instead of the published 10,000: the ridge
    selection solves 17 M x M systems per task (about 11 TFLOPs at M = 10,000, minutes on a CPU) and M only
    scales W and the readout, so the architecture check is the same at the smaller M."""
    c, m = config("ranpac"), 1000
    assert vit_params(224) + adapter_params(64) + D * 10_000 + 10_000 * 100 == 95_668_288  # published M, CIFAR-100
    own = adapter_params(c.bottleneck) + D * m + m * 100
    check(run_cli(env, "ranpac", "cifar100-2", True, "--set", f"projection_dim={m}"), [vit_params() + own] * 2,
          [vit_flops(adapter=c.bottleneck) + 2 * D * m + 2 * m * 100] * 2)


def test_preprompt(env):
    """Route head on the unprompted [CLS], then a second pass with the predicted task's prefix prompt (L key and
    L value tokens in each of the first `prompt_blocks` blocks, one prompt per task) and the label head; both
    heads cover all 100 classes. Its own checkpoint tag (the original ViT-B/16-IN21K) through the hub cache."""
    c = config("preprompt")
    prompts = c.prompt_blocks * 2 * 2 * c.prompt_length * D  # blocks x (key, value) x tasks x L x D
    prefix = {b: c.prompt_length for b in range(c.prompt_blocks)}
    check(run_cli(env, "preprompt"), [vit_params() + prompts + 2 * linear(D, 100)] * 2,
          [vit_flops() + vit_flops(prefix=prefix) + 2 * 2 * D * 100] * 2)


def cosine_head(n: int) -> int:
    """TUNA's bias-free cosine head without a scale parameter."""
    return D * n


# TUNA's family: alignment trains the head alone on sampled features; one epoch of it instead of 30 (the
# architecture and the inference path are the same)
ONE_ALIGNMENT = ("--set", "align_epochs=1")


def test_tuna(env):
    """Adapter in training, the evaluation slot, t stored task adapters; inference: one pass per stored
    adapter (minimum entropy) plus one with the merged universal adapter, each with the cosine head."""
    c = config("tuna")
    a, expert = adapter_params(c.bottleneck), vit_flops(adapter=c.bottleneck)
    check(run_cli(env, "tuna", "cifar100-2", True, *ONE_ALIGNMENT),
          [vit_params() + (2 + t) * a + cosine_head(n) for t, n in zip((1, 2), SEEN)],
          [(t + 1) * (expert + 2 * D * n) for t, n in zip((1, 2), SEEN)])


def test_daf(env):
    """One global adapter (fused after every task), the cosine head; one adapted pass per image. The two
    Fisher passes use 4 samples (training cost only)."""
    c = config("daf")
    check(run_cli(env, "daf", "cifar100-2", True, "--set", "align_epochs=1", "fisher_samples=4"),
          [vit_params() + adapter_params(c.bottleneck) + cosine_head(n) for n in SEEN],
          [vit_flops(adapter=c.bottleneck) + 2 * D * n for n in SEEN])


def test_sgds(env):
    """One shared adapter of bottleneck 64 (class unit masks are buffers), dense at inference: one pass."""
    c = config("sgds")
    assert c.bottleneck == 64
    check(run_cli(env, "sgds", "cifar100-2", True, *ONE_ALIGNMENT),
          [vit_params() + adapter_params(c.bottleneck) + cosine_head(n) for n in SEEN],
          [vit_flops(adapter=c.bottleneck) + 2 * D * n for n in SEEN])


def test_saef(env):
    """Like TUNA's parameters, plus the forest's merged parents (stored, counted). `exit_entropy=0`: every
    descent goes down to a leaf, so the inference cost is fixed by the trees (with tau_e = 1.0 the depth
    reached depends on the random weights' entropies): a one-leaf tree costs one expert pass, a two-leaf
    tree three (root, then both children)."""
    c = config("saef")
    result = run_cli(env, "saef", "cifar100-2", True, "--set", "align_epochs=1", "exit_entropy=0")
    trees = result["strategy_report"]["trees"]  # which tasks the clustering put together (data-dependent)
    assert sorted(leaf for tree in trees for leaf in tree) == [0, 1]
    parents = sum(len(tree) - 1 for tree in trees)
    passes = sum(1 if len(tree) == 1 else 3 for tree in trees)
    a, expert = adapter_params(c.bottleneck), vit_flops(adapter=c.bottleneck)
    check(result, [vit_params() + 3 * a + cosine_head(50), vit_params() + (4 + parents) * a + cosine_head(100)],
          [expert + 2 * D * 50, passes * (expert + 2 * D * 100)])


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


def test_icarl(env):
    """The model and its class means: the frozen copy of the previous model it distils from serves training
    and is reported as `teacher_params`, not in `total_params`. Inference: nearest class mean of the
    exemplars' features (one 512-wide mean per seen class, counted through `stored_state`)."""
    result = run_cli(env, "icarl", "cifar100-2", False)
    check(result, [resnet18_cifar_params() + linear(512, n) + 512 * n for n in SEEN],
          [resnet18_cifar_flops() + 2 * 512 * n for n in SEEN])
    assert result["edge"]["per_experience"][1]["teacher_params"] == resnet18_cifar_params() + linear(512, 50)


def test_lwf(env):
    """As iCaRL: the teacher (the model as the first task left it, 50-class head) is not in `total_params`."""
    result = run_cli(env, "lwf", "cifar100-2", False, "--backbone", "resnet18_cifar")
    check(result, [resnet18_cifar_params() + linear(512, n) for n in SEEN],
          [resnet18_cifar_flops() + 2 * 512 * n for n in SEEN])
    assert result["edge"]["per_experience"][1]["teacher_params"] == resnet18_cifar_params() + linear(512, 50)


def test_ewc(env):
    """Online EWC: the Fisher and the anchor are buffers (training only); the model is the network and head.
    The Fisher is estimated on 4 samples instead of the task's 150 (training cost only)."""
    check(run_cli(env, "ewc", "cifar100-2", False, "--backbone", "resnet18_cifar", "--set", "fisher_samples=4"),
          [resnet18_cifar_params() + linear(512, n) for n in SEEN], [resnet18_cifar_flops() + 2 * 512 * n for n in SEEN])


def test_cls_er(env):
    """The working model and its two EMA copies (plastic, stable); inference runs the stable one."""
    check(run_cli(env, "cls_er", "cifar100-2", False), [3 * (resnet18_cifar_params() + linear(512, n)) for n in SEEN],
          [resnet18_cifar_flops() + 2 * 512 * n for n in SEEN])


def test_clfd(env):
    """CLFD-ER: a Haar transform and three bias-free 1x1 convolutions (3 + 12 + 9 weights) make a 3-channel
    16x16 code; the ResNet-18 runs on the code (a quarter of the pixels). The Haar transform itself is a
    fixed elementwise op (not counted)."""
    encoder = 3 + 4 * 3 + 3 * 3
    check(run_cli(env, "clfd", "cifar100-2", False), [resnet18_cifar_params() + encoder + linear(512, n) for n in SEEN],
          [2 * encoder * 16 * 16 + resnet18_cifar_flops(side=16) + 2 * 512 * n for n in SEEN])


def test_fdinet(env):
    """Two CIFAR ResNet-18 branches of width nf on the 16x16 Haar bands (LL: 3 channels, details: 9), pooled
    features concatenated (2 x 8nf) before one head."""
    nf = config("fdinet").nf
    branches = resnet18_cifar_params(nf, 3) + resnet18_cifar_params(nf, 9)
    assert branches / resnet18_cifar_params() == pytest.approx(0.22, abs=0.01)  # "-78% parameters"
    check(run_cli(env, "fdinet", "cifar100-2", False), [branches + linear(16 * nf, n) for n in SEEN],
          [resnet18_cifar_flops(nf, 16, 3) + resnet18_cifar_flops(nf, 16, 9) + 2 * 16 * nf * n for n in SEEN])


def test_etag(env):
    """The ResNet-18 and all-class classifier, three auxiliary branches (fresh copies of the stages after
    stages 1, 2, 3, each with a 4C rotation head), the 4th branch (two stride-1 512-wide blocks, 4C head) and
    the conditional VAE over features (encoder, mean / log-variance, decoder); inference: network and
    classifier. One generator epoch instead of 100 (training time only)."""
    c, C = config("etag"), 100
    widths = (64, 128, 256, 512)
    stages = [conv_params(basic_stage(cin, cout, 2, 32)) for cin, cout in zip(widths, widths[1:])]  # stages 2, 3, 4
    branches = sum(sum(stages[k:]) + linear(512, 4 * C) for k in range(3))
    branches += conv_params(basic_stage(512, 512, 1, 4)) + linear(512, 4 * C)
    h, z = c.hidden, c.latent
    vae = (linear(512 + C, h) + linear(h, h) + 2 * linear(h, z)
           + linear(z + C, h) + linear(h, h) + linear(h, 512))
    check(run_cli(env, "etag", "cifar100-2", False, "--set", "generator_epochs=1"),
          [resnet18_cifar_params() + linear(512, C) + branches + vae] * 2, [resnet18_cifar_flops() + 2 * 512 * C] * 2)


def test_lord(env):
    """The full ResNet-18 and an all-class head hold every student; inference runs the student, a prefix
    sub-network. With two tasks the released cosine schedule (r = 1, 19 widths) reaches stage 1 in the
    first task and adds nothing in the last: width 0.05 for the stages and for the blocks' inner
    expansion, i.e. stage channels 3.2, 6.4, 12.8, 25.6 rounded to multiples of 8 (at least 8, never
    more than 10% below): 8, 8, 16, 24, and inner widths 0.05 x those: 8 in every block; the pooled
    24 features are zero-padded to the head's 512 inputs."""
    check(run_cli(env, "lord", "cifar100-2", False), [resnet18_cifar_params() + linear(512, 100)] * 2,
          [conv_flops(resnet18_cifar_convs(widths=(8, 8, 16, 24), inner=8)) + 2 * 512 * 100] * 2)
