"""Tiny benchmark fixtures written in the datasets' real on-disk formats.

Real class counts (10/100 for CIFAR, 200 for Tiny-ImageNet, ImageNet-R and CUB, the
100 listed wnids for the ImageNet subset) with one or two small images per class, so
the real parsing code runs on the real layout in well under a second.  Every image
encodes its ORIGINAL label in its pixels (`encode_label`), so a test can check that a
sample's class-order position maps back to the label it was written with.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


# --------------------------------------------------------------------------- label <-> pixels
def encode_label(label: int) -> tuple[int, int, int]:
    """An RGB colour for `label` (0..255) spaced 16 apart per channel, so JPEG keeps it decodable."""
    return (label // 16) * 16 + 8, (label % 16) * 16 + 8, 128


def decode_label(x, mean, std) -> int:
    """The label encoded in a normalized (3, H, W) tensor (read at its center)."""
    c, h, w = x.shape
    pixel = [float(x[i, h // 2, w // 2]) * std[i] + mean[i] for i in range(3)]
    r, g = (round(v * 255) for v in pixel[:2])
    return (r // 16) * 16 + (g // 16)


def _solid(label: int, size: int) -> np.ndarray:
    return np.broadcast_to(np.array(encode_label(label), dtype=np.uint8), (size, size, 3)).copy()


def _save_image(path: Path, label: int, size: int = 8, fmt: str = "JPEG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_solid(label, size)).save(path, format=fmt, quality=95)


# --------------------------------------------------------------------------- CIFAR
def _cifar_rows(labels: list[int]) -> np.ndarray:
    """N x 3072 uint8 rows (channel-major, as in the real pickles), each a solid label colour."""
    return np.stack([_solid(y, 32).transpose(2, 0, 1).reshape(-1) for y in labels])


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = [c for c in range(10) for _ in range(train_per_class)]
    for i in range(5):  # five batches, as in the real archive
        part = train[i::5]
        _dump(folder / f"data_batch_{i + 1}", {b"batch_label": b"training batch", b"labels": part, b"data": _cifar_rows(part), b"filenames": [b"x.png"] * len(part)})
    test = [c for c in range(10) for _ in range(test_per_class)]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test, b"data": _cifar_rows(test), b"filenames": [b"x.png"] * len(test)})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return folder


def write_cifar100(root: Path, train_per_class: int = 1, test_per_class: int = 1) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for c in range(100) for _ in range(per)]
        _dump(folder / split, {b"filenames": [b"x.png"] * len(fine), b"batch_label": split.encode(), b"fine_labels": fine, b"coarse_labels": [c // 5 for c in fine], b"data": _cifar_rows(fine)})
    _dump(folder / "meta", {b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)], b"coarse_label_names": [f"super{c}".encode() for c in range(20)]})
    return folder


# --------------------------------------------------------------------------- image folders
def imagenet_r_wnids() -> list[str]:
    """The 200 real ImageNet-R wnids (timm ships the list)."""
    from importlib.resources import files

    return files("timm.data").joinpath("_info/imagenet_r_synsets.txt").read_text().split()


def write_tinyimagenet(root: Path, train_per_class: int = 1, val_per_class: int = 1) -> Path:
    folder = root / "tiny-imagenet-200"
    wnids = imagenet_r_wnids()  # any 200 real wnids; wnids.txt is deliberately not sorted
    shuffled = list(np.random.RandomState(0).permutation(wnids))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(shuffled) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    label = {w: i for i, w in enumerate(sorted(wnids))}
    for w in wnids:
        lines = []
        for k in range(train_per_class):
            _save_image(folder / "train" / w / "images" / f"{w}_{k}.JPEG", label[w], 64)
            lines.append(f"{w}_{k}.JPEG\t0\t0\t63\t63\n")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("".join(lines))
    annotations = []
    for i, w in enumerate(w for w in wnids for _ in range(val_per_class)):
        _save_image(folder / "val" / "images" / f"val_{i}.JPEG", label[w], 64)
        annotations.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(annotations))
    (folder / "test" / "images").mkdir(parents=True)
    return folder


def write_imagenet_r(root: Path, per_class: int = 2, presplit: bool = False) -> Path:
    folder = root / "imagenet-r"
    for label, w in enumerate(imagenet_r_wnids()):
        for k in range(per_class):
            sub = (folder / ("train" if k % 2 == 0 else "test") / w) if presplit else folder / w
            _save_image(sub / f"art_{k}.jpg", label)
    (folder / "README.txt").write_text("ImageNet-R fixture\n")
    return folder


def write_cub(root: Path) -> Path:
    """CUB_200_2011 with 2 images per class (one train, one test) and its four index files."""
    folder = root / "CUB_200_2011"
    classes, images, split, labels = [], [], [], []
    image_id = 0
    for c in range(1, 201):
        cls = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {cls}\n")
        for k in range(2):
            image_id += 1
            rel = f"{cls}/Bird_{c}_{k:04d}_{image_id}.jpg"
            _save_image(folder / "images" / rel, c - 1)
            images.append(f"{image_id} {rel}\n")
            split.append(f"{image_id} {1 if k == 0 else 0}\n")
            labels.append(f"{image_id} {c}\n")
    (folder / "classes.txt").write_text("".join(classes))
    (folder / "images.txt").write_text("".join(images))
    (folder / "train_test_split.txt").write_text("".join(split))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    return folder


def write_imagenet_subset(root: Path, wnids: list[str], extra: int = 3) -> Path:
    """ImageNet train/val class folders for `wnids` (+ a few classes outside the subset)."""
    folder = root / "imagenet"
    natural = sorted(wnids)
    others = [f"n9999999{i}" for i in range(extra)]
    for w in wnids + others:
        label = natural.index(w) if w in natural else 255
        _save_image(folder / "train" / w / f"{w}_1.JPEG", label)
        _save_image(folder / "val" / w / f"ILSVRC2012_val_{w}.JPEG", label)
    return folder


@pytest.fixture(scope="session")
def fixtures():
    """The writers and label helpers (tests is not a package, so they are handed out as a fixture)."""
    import types

    return types.SimpleNamespace(
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_tinyimagenet=write_tinyimagenet,
        write_imagenet_r=write_imagenet_r,
        write_cub=write_cub,
        write_imagenet_subset=write_imagenet_subset,
        imagenet_r_wnids=imagenet_r_wnids,
        decode_label=decode_label,
        encode_label=encode_label,
    )
