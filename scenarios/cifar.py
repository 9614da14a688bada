"""CIFAR-10 and CIFAR-100 class-incremental benchmarks, read from the python pickles.

Files: `<data root>/cifar-10-batches-py/` and `<data root>/cifar-100-python/`, as
extracted from the tarballs torchvision downloads.  A tarball lying in the data root is
MD5-checked and extracted; `--download` fetches it with torchvision.

Protocols: Seq-CIFAR-10 of Mammoth (natural class order, RandomCrop(32, 4) + flip) and
the CIFAR-100 splits of PyCIL/PILOT (classes shuffled with seed 1993, crop + flip +
brightness jitter of 63/255).  The images stay in memory as uint8 and are normalized
(and, for `image_size` other than 32, resized as PILOT's CIFAR-224 does) per batch.
"""

from __future__ import annotations

import socket
import tarfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from clbench.scenarios import _files
from clbench.scenarios._images import (
    ImageTensors,
    PadCropFlip,
    Preprocess,
    ResizedCropFlip,
    image_size,
    normalization,
)
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    class_incremental_from_datasets,
    data_root,
    resolve_class_order,
    seeded_permutation,
    split_increments,
)

from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import register_scenario

DOWNLOAD_TIMEOUT_S = 10.0  # per network operation: a dead network fails in seconds, not minutes


@dataclass(frozen=True)
class CifarFormat:
    title: str
    torchvision_class: str  # where the URL, folder, tarball name and tarball MD5 come from
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def source(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)


CIFAR10 = CifarFormat(
    title="CIFAR-10",
    torchvision_class="CIFAR10",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),  # Mammoth seq-cifar10
    std=(0.2470, 0.2435, 0.2615),
)

CIFAR100 = CifarFormat(
    title="CIFAR-100",
    torchvision_class="CIFAR100",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    mean=(0.5071, 0.4867, 0.4408),  # PyCIL iCIFAR100
    std=(0.2675, 0.2565, 0.2761),
)


# --------------------------------------------------------------------------- registered scenarios
@register_scenario("cifar10-5")
def cifar10_5(options: ScenarioOptions) -> Scenario:
    """Seq-CIFAR-10 (Mammoth): 5 experiences x 2 classes, natural class order."""
    return build("cifar10-5", CIFAR10, split_increments(10, 5), options, paper_order=None, brightness=0.0)


@register_scenario("cifar100-5")
def cifar100_5(options: ScenarioOptions) -> Scenario:
    """CIFAR-100, 5 experiences x 20 classes (PyCIL order: seed 1993)."""
    return _cifar100("cifar100-5", split_increments(100, 5), options)


@register_scenario("cifar100-10")
def cifar100_10(options: ScenarioOptions) -> Scenario:
    """CIFAR-100, 10 experiences x 10 classes (PyCIL order: seed 1993)."""
    return _cifar100("cifar100-10", split_increments(100, 10), options)


@register_scenario("cifar100-20")
def cifar100_20(options: ScenarioOptions) -> Scenario:
    """CIFAR-100, 20 experiences x 5 classes (PyCIL order: seed 1993)."""
    return _cifar100("cifar100-20", split_increments(100, 20), options)


@register_scenario("cifar100-b50-5")
def cifar100_b50_5(options: ScenarioOptions) -> Scenario:
    """CIFAR-100 B50: 50 classes first, then 5 steps x 10 classes (6 experiences)."""
    return _cifar100("cifar100-b50-5", split_increments(100, 6, first=50), options)


@register_scenario("cifar100-b50-10")
def cifar100_b50_10(options: ScenarioOptions) -> Scenario:
    """CIFAR-100 B50: 50 classes first, then 10 steps x 5 classes (11 experiences)."""
    return _cifar100("cifar100-b50-10", split_increments(100, 11, first=50), options)


def _cifar100(name: str, increments: list[int], options: ScenarioOptions) -> Scenario:
    return build(name, CIFAR100, increments, options, paper_order=seeded_permutation(100, 1993), brightness=63 / 255)


# --------------------------------------------------------------------------- building
def build(
    name: str, fmt: CifarFormat, increments: list[int], options: ScenarioOptions, *, paper_order, brightness: float
) -> Scenario:
    size = image_size(options.image_size, 32)
    mean, std = normalization(options.normalization, fmt.mean, fmt.std)
    (train_x, train_y), (test_x, test_y), names = load(fmt, data_root(options), download=options.download)
    order = resolve_class_order(options.class_order, train_y.tolist(), paper_order)
    if size == 32:
        preprocess = Preprocess(size=32, resize=32, mean=mean, std=std)
        augment = PadCropFlip(pad=4, mean=mean, std=std, brightness=brightness)
    else:  # PILOT's CIFAR at ViT resolution: bicubic resize to 256/224 of the side, center crop
        preprocess = Preprocess(size=size, resize=size * 256 // 224, mean=mean, std=std, bicubic=True)
        augment = ResizedCropFlip(scale=(0.05, 1.0))
    return class_incremental_from_datasets(
        name,
        ImageTensors(train_x, train_y, preprocess),
        ImageTensors(test_x, test_y, preprocess),
        increments=increments,
        class_order=order,
        default_backbone="resnet18_cifar" if size == 32 else "vit_base_patch16_224",
        input_shape=(3, size, size),
        class_names=[names[c] for c in order],
        augment=augment,
        mean=mean,
        std=std,
        meta={
            "source": f"{fmt.title} python version ({fmt.source.filename})",
            "image_size": size,
            "normalization": options.normalization,
            "paper_class_order": "natural (Mammoth)" if paper_order is None else "numpy seed 1993 permutation (PyCIL/PILOT)",
        },
    )


def load(fmt: CifarFormat, root: Path, *, download: bool = False):
    """((train x, y), (test x, y), class names): uint8 (N, 3, 32, 32) images and int64 labels."""
    src = fmt.source
    folder = root / src.base_folder
    expected = [*fmt.train_files, *fmt.test_files, fmt.meta_file]
    how = f"download {src.url} and extract it into {root}, or rerun with --download"
    if not all((folder / f).is_file() for f in expected):
        tarball = root / src.filename
        if tarball.is_file():
            _files.verify_md5(tarball, src.tgz_md5, how=how)
            _extract(tarball, root)
        elif download:
            _download(fmt, root)
        else:
            missing = [f for f in expected if not (folder / f).is_file()]
            raise _files.missing_error(folder, missing, dataset=fmt.title, how=how)
        _files.require(folder, expected, dataset=fmt.title, how=f"the archive did not hold them; {how}")
    redo = f"delete {folder} and extract {src.filename} again"
    train = _read_batches([folder / f for f in fmt.train_files], fmt.label_key, fmt.num_classes, redo)
    test = _read_batches([folder / f for f in fmt.test_files], fmt.label_key, fmt.num_classes, redo)
    meta = _files.read_pickle(folder / fmt.meta_file, how=redo)
    if fmt.names_key not in meta or len(meta[fmt.names_key]) != fmt.num_classes:
        raise UsageError(f"{folder / fmt.meta_file} lacks {fmt.num_classes} class names under {fmt.names_key!r}; {redo}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[fmt.names_key]]
    return train, test, names


def _read_batches(paths: list[Path], label_key: bytes, num_classes: int, how: str):
    xs, ys = [], []
    for path in paths:
        batch = _files.read_pickle(path, how=how)
        for key in (b"data", label_key):
            if key not in batch:
                raise UsageError(f"{path} has no {key!r} entry (keys: {sorted(batch)}); {how}")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise UsageError(
                f"{path} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; "
                f"expected N x 3072 uint8 and N labels; {how}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise UsageError(f"{path} has labels outside 0..{num_classes - 1}; {how}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _extract(tarball: Path, root: Path) -> None:
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")
            else:  # Python < 3.11.4: refuse members that would land outside the root
                for member in tar.getmembers():
                    if not (root / member.name).resolve().is_relative_to(root.resolve()):
                        raise tarfile.TarError(f"member {member.name!r} points outside {root}")
                tar.extractall(root)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise UsageError(f"cannot extract {tarball} ({type(e).__name__}: {e}); delete it and download it again") from None


def _download(fmt: CifarFormat, root: Path) -> None:
    """torchvision's download (it checks the tarball's MD5), bounded in time; any failure is one clear error."""
    from torchvision.datasets.utils import download_and_extract_archive

    src = fmt.source
    manual = f"download {src.url} yourself and place {src.filename} in {root}"
    try:
        if not urllib.request.getproxies():  # behind a proxy the proxy resolves the name
            _resolve_host(urlparse(src.url).hostname or "", DOWNLOAD_TIMEOUT_S)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(src.url, str(root), filename=src.filename, md5=src.tgz_md5)
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as e:  # URLError, timeouts, HTTP errors, torchvision's "corrupted" RuntimeError
        partial = root / src.filename
        if partial.is_file() and _files.md5sum(partial) != src.tgz_md5:
            partial.unlink()
        raise DataNotFoundError(f"{fmt.title}: --download from {src.url} failed ({type(e).__name__}: {e}); {manual}") from None


def _resolve_host(host: str, timeout: float) -> None:
    """Name resolution ignores socket timeouts; bound it with a helper thread."""
    outcome: list = []

    def resolve():
        try:
            outcome.append(socket.getaddrinfo(host, 443))
        except OSError as e:
            outcome.append(e)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError(f"resolving {host} took more than {timeout:.0f} s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
