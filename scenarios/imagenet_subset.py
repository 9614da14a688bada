"""The 100-class ImageNet subset of eTag, class-incremental.

Files: `<data root>/imagenet/train/<wnid>/*.JPEG` and `<data root>/imagenet/val/<wnid>/*.JPEG`
(ILSVRC-2012 with the validation images sorted into class folders); the folders may
hold all 1,000 classes, only the 100 listed in `data/imagenet_subset_100.txt` are read,
per item.  eTag's protocol: ResNet-18, 224 px (resize 256, center crop),
RandomResizedCrop + flip, ImageNet mean/std, and eTag's class order (the file's order).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from clbench.scenarios import _files
from clbench.scenarios._images import Protocol, image_folder_scenario
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    data_root,
    split_increments,
)

from clbench.errors import UsageError
from clbench.registry import register_scenario

FOLDER = "imagenet"
URL = "https://image-net.org/download-images.php (ILSVRC2012 train and val)"

ETAG = Protocol(
    size=224,
    resize_ratio=256 / 224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    augment="resized_crop",
    crop_scale=(0.08, 1.0),
    backbone="resnet18",
)


def subset_wnids() -> list[str]:
    """The subset's wnids in eTag's order (line k is the class eTag labels k)."""
    return _files.read_names_text(files("clbench.scenarios").joinpath("data/imagenet_subset_100.txt").read_text(encoding="utf-8"))


@register_scenario("imagenet-subset-10")
def imagenet_subset_10(options: ScenarioOptions) -> Scenario:
    """ImageNet-Subset (eTag's 100 classes), 10 experiences x 10 classes, eTag's order."""
    return build("imagenet-subset-10", split_increments(100, 10), options)


@register_scenario("imagenet-subset-b50-5")
def imagenet_subset_b50_5(options: ScenarioOptions) -> Scenario:
    """ImageNet-Subset B50: 50 classes first, then 5 steps x 10 classes (eTag's 5-task setting)."""
    return build("imagenet-subset-b50-5", split_increments(100, 6, first=50), options)


@register_scenario("imagenet-subset-b50-10")
def imagenet_subset_b50_10(options: ScenarioOptions) -> Scenario:
    """ImageNet-Subset B50: 50 classes first, then 10 steps x 5 classes (eTag's 10-task setting)."""
    return build("imagenet-subset-b50-10", split_increments(100, 11, first=50), options)


def build(name: str, increments: list[int], options: ScenarioOptions) -> Scenario:
    root = data_root(options)
    listed = subset_wnids()
    natural = sorted(listed)
    how = (
        f"download {URL}, extract train/ and val/ into {root / FOLDER} with one folder per wnid "
        f"(sort val/ into class folders, e.g. with ImageNet's valprep.sh)"
    )
    train, test = (read_split(root / FOLDER / split, natural, how=how) for split in ("train", "val"))
    return image_folder_scenario(
        name,
        options,
        ETAG,
        train,
        test,
        increments=increments,
        class_names=natural,
        paper_order=[natural.index(w) for w in listed],
        meta={"source": "ImageNet-1k train/ and val/ class folders, eTag's 100 classes", "paper_class_order": "eTag (numpy seed 1993 over the 1,000 sorted wnids)"},
    )


def read_split(directory: Path, wnids: list[str], *, how: str):
    """(paths, labels) of the listed classes in `directory`; labels index `wnids`."""
    if not directory.is_dir():
        raise _files.missing_error(directory, [f"{len(wnids)} class folders such as {wnids[0]}/"], dataset="ImageNet-Subset", how=how)
    missing = [f"{w}/" for w in wnids if not (directory / w).is_dir()]
    if missing:
        flat = any(_files.image_files(directory)[:1])
        hint = " (it holds images directly: the validation images must be sorted into class folders)" if flat else ""
        raise _files.missing_error(directory, missing, dataset="ImageNet-Subset", how=how + hint)
    paths, labels = [], []
    for label, w in enumerate(wnids):
        found = _files.image_files(directory / w)
        if not found:
            raise UsageError(f"{directory / w} holds no images; {how}")
        paths += found
        labels += [label] * len(found)
    return paths, labels
