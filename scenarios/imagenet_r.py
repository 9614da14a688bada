"""ImageNet-R in 10 experiences of 20 classes, as in PILOT's pre-trained-model CIL benchmarks.

Files under `<data root>/imagenet-r/`, either
- `train/<wnid>/*` and `test/<wnid>/*`: a pre-made split (PILOT's layout; used as is), or
- `<wnid>/*`: the official archive (200 class folders, 30,000 images), split here 80/20
  per class with a fixed seed (SPLIT_SEED, the same for every run and method).
Images are read from disk per item.  PILOT's protocol: 224x224 inputs (bicubic resize
to 256 then center crop), RandomResizedCrop(scale 0.05-1) + flip, no normalization
(pixels in [0, 1]), a ViT-B/16 backbone, classes shuffled with numpy seed 1993.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from clbench.scenarios import _files
from clbench.scenarios._images import Protocol, image_folder_scenario
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    data_root,
    seeded_permutation,
    split_increments,
)

from clbench.errors import UsageError
from clbench.registry import register_scenario

URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
FOLDER = "imagenet-r"
NUM_CLASSES = 200
SPLIT_SEED = 0
TEST_FRACTION = 0.2

PILOT = Protocol(
    size=224,
    resize_ratio=256 / 224,
    mean=(0.0, 0.0, 0.0),  # PILOT feeds ToTensor() output: "dataset" normalization means none
    std=(1.0, 1.0, 1.0),
    augment="resized_crop",
    crop_scale=(0.05, 1.0),
    bicubic=True,
    backbone="vit_base_patch16_224",
)


@register_scenario("imagenet-r-10")
def imagenet_r_10(options: ScenarioOptions) -> Scenario:
    """ImageNet-R, 200 classes in 10 experiences x 20 (PILOT: seed-1993 order, 224 px, ViT-B/16)."""
    root = data_root(options)
    how = f"download {URL} and extract it into {root} (or put a train/ and test/ split under {root / FOLDER})"
    train, test, wnids, layout = read(root / FOLDER, how=how)
    return image_folder_scenario(
        "imagenet-r-10",
        options,
        PILOT,
        train,
        test,
        increments=split_increments(NUM_CLASSES, 10),
        class_names=wnids,
        paper_order=seeded_permutation(NUM_CLASSES, 1993),
        meta={"source": f"ImageNet-R ({layout})", "paper_class_order": "numpy seed 1993 permutation (PILOT)"},
    )


def read(folder: Path, *, how: str):
    """((train paths, labels), (test paths, labels), sorted wnids, layout description)."""
    if not folder.is_dir():
        raise _files.missing_error(folder, [f"{NUM_CLASSES} class folders <wnid>/ (or train/ and test/)"], dataset="ImageNet-R", how=how)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        wnids = _class_folders(folder / "train", how)
        if _files.class_folders(folder / "test") != wnids:
            raise UsageError(f"{folder / 'test'} does not hold the same {NUM_CLASSES} class folders as {folder / 'train'}; {how}")
        label = {w: i for i, w in enumerate(wnids)}
        splits = []
        for split in ("train", "test"):
            paths, labels = [], []
            for w in wnids:
                files = _nonempty(folder / split / w, how)
                paths += files
                labels += [label[w]] * len(files)
            splits.append((paths, labels))
        return splits[0], splits[1], wnids, "train/ and test/ folders"

    wnids = _class_folders(folder, how)
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = ([], []), ([], [])
    for label, w in enumerate(wnids):
        files = _nonempty(folder / w, how)
        if len(files) < 2:
            raise UsageError(f"{folder / w} holds {len(files)} image; at least 2 are needed to split train/test; {how}")
        shuffled = [files[i] for i in rng.permutation(len(files))]
        n_test = min(len(files) - 1, max(1, round(TEST_FRACTION * len(files))))
        for part, chosen in ((test, shuffled[:n_test]), (train, shuffled[n_test:])):
            part[0].extend(sorted(chosen))
            part[1].extend([label] * len(chosen))
    return train, test, wnids, f"class folders, {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} per-class split, seed {SPLIT_SEED}"


def _class_folders(directory: Path, how: str) -> list[str]:
    wnids = [w for w in _files.class_folders(directory) if w not in ("train", "test")]
    if len(wnids) != NUM_CLASSES:
        raise UsageError(f"{directory} holds {len(wnids)} class folders, expected {NUM_CLASSES}; {how}")
    return wnids


def _nonempty(directory: Path, how: str) -> list[str]:
    files = _files.image_files(directory)
    if not files:
        raise UsageError(f"{directory} holds no images; {how}")
    return files
