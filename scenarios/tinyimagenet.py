"""Seq-TinyImageNet (Mammoth): Tiny-ImageNet's 200 classes in 10 experiences of 20.

Files: `<data root>/tiny-imagenet-200/` as unzipped from the official archive:
`wnids.txt`, `train/<wnid>/images/*.JPEG` (500 per class) and `val/images/*.JPEG`
labelled by `val/val_annotations.txt` (50 per class; the unlabelled `test/` split is
not used).  Images are read from disk per item.  The natural class order is the
sorted wnids (ImageFolder's order); Mammoth keeps the natural order.
"""

from __future__ import annotations

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

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"

MAMMOTH = Protocol(
    size=64,
    resize_ratio=1.0,
    mean=(0.4802, 0.4480, 0.3975),  # Mammoth seq-tinyimg
    std=(0.2770, 0.2691, 0.2821),
    augment="pad_crop",
    backbone="resnet18_cifar",  # Mammoth's ResNet-18 (3x3 stem) on 64x64 inputs
)


@register_scenario("tinyimagenet-10")
def tinyimagenet_10(options: ScenarioOptions) -> Scenario:
    """Seq-TinyImageNet (Mammoth): 10 experiences x 20 classes, natural (sorted wnid) order."""
    root = data_root(options)
    train, test, wnids = read(root / FOLDER, how=f"download {URL} and unzip it into {root}")
    return image_folder_scenario(
        "tinyimagenet-10",
        options,
        MAMMOTH,
        train,
        test,
        increments=split_increments(200, 10),
        class_names=wnids,
        paper_order=None,
        meta={"source": "Tiny-ImageNet (train/, val/ with val_annotations.txt)", "paper_class_order": "natural (Mammoth)"},
    )


def read(folder, *, how: str):
    """((train paths, labels), (val paths, labels), sorted wnids); labels index the sorted wnids."""
    _files.require(folder, ["wnids.txt", "train", "val/val_annotations.txt", "val/images"], dataset="Tiny-ImageNet", how=how)
    listed = _files.read_names(folder / "wnids.txt")
    wnids = sorted(set(listed))
    if len(wnids) != 200 or len(listed) != 200:
        raise UsageError(f"{folder / 'wnids.txt'} lists {len(listed)} wnids ({len(wnids)} distinct), expected 200; {how}")
    label = {w: i for i, w in enumerate(wnids)}

    missing = [f"train/{w}/images" for w in wnids if not (folder / "train" / w / "images").is_dir()]
    if missing:
        raise _files.missing_error(folder, missing, dataset="Tiny-ImageNet", how=how)
    train_paths, train_labels = [], []
    for w in wnids:
        files = _files.image_files(folder / "train" / w / "images")
        if not files:
            raise UsageError(f"{folder / 'train' / w / 'images'} holds no images; {how}")
        train_paths += files
        train_labels += [label[w]] * len(files)

    annotations = folder / "val" / "val_annotations.txt"
    val_paths, val_labels = [], []
    for number, (name, wnid, *_) in enumerate(_files.read_table(annotations, 2, sep="\t", how=how), 1):
        if wnid not in label:
            raise UsageError(f"{annotations} row {number} names wnid {wnid!r}, which wnids.txt does not list; {how}")
        path = folder / "val" / "images" / name
        if not path.is_file():
            raise _files.missing_error(folder / "val" / "images", [name], dataset="Tiny-ImageNet", how=how)
        val_paths.append(str(path))
        val_labels.append(label[wnid])
    return (train_paths, train_labels), (val_paths, val_labels), wnids
