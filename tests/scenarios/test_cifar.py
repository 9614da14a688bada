"""CIFAR-10/100 scenarios on pickles written in the real `cifar-*-python` layout."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clbench.scenarios import cifar
from clbench.scenarios.base import ScenarioOptions

from clbench.datasets import dataset_labels, make_loader
from clbench.engine.runner import create_scenario
from clbench.errors import DataNotFoundError, UsageError

PYCIL_CIFAR100_ORDER_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # as printed in PyCIL's logs


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory, fixtures):
    root = tmp_path_factory.mktemp("data")
    fixtures.write_cifar10(root)
    fixtures.write_cifar100(root)
    return root


def build(name, root, **options):
    from clbench.registry import SCENARIOS

    return SCENARIOS.get(name)(ScenarioOptions(data_root=str(root), **options))


@pytest.mark.parametrize(
    "name, increments",
    [
        ("cifar10-5", [2] * 5),
        ("cifar100-5", [20] * 5),
        ("cifar100-10", [10] * 10),
        ("cifar100-20", [5] * 20),
        ("cifar100-b50-5", [50] + [10] * 5),
        ("cifar100-b50-10", [50] + [5] * 10),
    ],
)
def test_experiences_partition_the_classes(cifar_root, fixtures, name, increments):
    s = build(name, cifar_root)
    assert s.increments == increments and s.num_experiences == len(increments)
    seen: set[int] = set()
    for i in range(s.num_experiences):
        expected = set(s.experience_classes(i))
        for split in (s.train_sets[i], s.test_sets[i]):
            labels = set(dataset_labels(split).tolist())
            assert labels == expected
        assert not (expected & seen)
        seen |= expected
    assert seen == set(range(s.num_classes))


def test_each_sample_keeps_its_original_label(cifar_root, fixtures):
    """Position p in the class order must hold the images written with label class_order[p]."""
    s = build("cifar100-10", cifar_root)
    for split in (s.train_sets[0], s.test_sets[3], s.train_sets[9]):
        batch = next(iter(make_loader(split, 64, shuffle=False)))
        assert batch.x.shape[1:] == (3, 32, 32) and batch.x.dtype == torch.float32
        for x, y in zip(batch.x, batch.y):
            assert fixtures.decode_label(x, s.mean, s.std) == s.class_order[int(y)]


def test_train_sizes_follow_the_pickles(cifar_root):
    s = build("cifar10-5", cifar_root)
    assert [len(d) for d in s.train_sets] == [4] * 5  # 2 images per class, over 5 pickled batches
    assert [len(d) for d in s.test_sets] == [2] * 5
    assert s.class_names[:2] == ["airplane", "automobile"]


def test_class_orders(cifar_root):
    paper = build("cifar100-10", cifar_root, class_order="paper")
    assert paper.class_order[:10] == PYCIL_CIFAR100_ORDER_HEAD
    assert build("cifar100-10", cifar_root).class_order == paper.class_order  # default is the paper's
    assert build("cifar100-10", cifar_root, class_order="natural").class_order == list(range(100))
    assert build("cifar10-5", cifar_root, class_order="paper").class_order == list(range(10))  # Mammoth
    a = build("cifar100-10", cifar_root, class_order="seed:3")
    b = build("cifar100-10", cifar_root, class_order="seed:3")
    c = build("cifar100-10", cifar_root, class_order="seed:4")
    assert a.class_order == b.class_order != c.class_order
    assert sorted(a.class_order) == list(range(100)) and a.class_order != list(range(100))
    assert a.describe()["class_order"] == a.class_order


def test_image_size_and_normalization_options(cifar_root):
    s = build("cifar10-5", cifar_root, image_size=64, normalization="none")
    assert s.input_shape == (3, 64, 64) and s.default_backbone == "vit_base_patch16_224"
    x = next(iter(make_loader(s.test_sets[0], 2, shuffle=False))).x
    assert x.shape == (2, 3, 64, 64)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # solid images stay solid through the bicubic resize and crop: the colour of label 0
    assert torch.allclose(x[0, :, 32, 32], torch.tensor([8, 8, 128]) / 255, atol=1e-3)
    assert s.mean == (0.0, 0.0, 0.0) and s.std == (1.0, 1.0, 1.0)
    vit = build("cifar10-5", cifar_root, normalization="inception")
    assert vit.mean == (0.5, 0.5, 0.5)
    with pytest.raises(UsageError, match="normalization 'zca'"):
        build("cifar10-5", cifar_root, normalization="zca")
    with pytest.raises(UsageError, match="image_size=2"):
        build("cifar10-5", cifar_root, image_size=2)


def test_missing_root_names_directory_files_and_url(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as e:
        build("cifar100-10", tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in msg
    assert "train, test, meta" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg and "--download" in msg
    assert "\n" not in msg
    assert time.perf_counter() - start < 5


def test_partially_extracted_folder_names_the_missing_batch(tmp_path, fixtures):
    folder = fixtures.write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match=r"for data_batch_3 \(not there\)"):
        build("cifar10-5", tmp_path)


def test_truncated_pickle_is_an_error_naming_the_file(tmp_path, fixtures):
    folder = fixtures.write_cifar100(tmp_path)
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=f"{folder / 'train'} is corrupt or truncated"):
        build("cifar100-10", tmp_path)


def test_pickle_without_the_label_key_is_an_error(tmp_path, fixtures):
    import pickle

    folder = fixtures.write_cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"fine_labels"] = batch.pop(b"labels")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(UsageError, match=r"test_batch has no b'labels' entry"):
        build("cifar10-5", tmp_path)


# --------------------------------------------------------------------------- tarballs and download
def _tarball_of(folder: Path, path: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_tarball_with_the_published_md5_is_extracted(tmp_path, fixtures, monkeypatch):
    import shutil

    import torchvision

    staging = tmp_path / "staging"
    folder = fixtures.write_cifar10(staging)
    root = tmp_path / "root"
    root.mkdir()
    md5 = _tarball_of(folder, root / "cifar-10-python.tar.gz")
    shutil.rmtree(staging)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)  # the fixture stands in for the real archive
    s = build("cifar10-5", root)
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert sum(len(d) for d in s.train_sets) == 20


def test_tarball_with_a_wrong_md5_is_rejected(tmp_path, fixtures):
    staging = tmp_path / "staging"
    folder = fixtures.write_cifar10(staging)
    root = tmp_path / "root"
    root.mkdir()
    _tarball_of(folder, root / "cifar-10-python.tar.gz")
    with pytest.raises(UsageError) as e:
        build("cifar10-5", root)
    msg = str(e.value)
    assert f"{root / 'cifar-10-python.tar.gz'} is corrupt or truncated" in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg  # torchvision's published MD5
    assert not (root / "cifar-10-batches-py").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch, no_proxy):
    import torchvision

    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as e:
        build("cifar10-5", tmp_path, download=True)
    assert time.perf_counter() - start < 10
    msg = str(e.value)
    assert f"--download from {url} failed" in msg and str(tmp_path) in msg
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_download_from_a_silent_server_times_out(tmp_path, monkeypatch, no_proxy):
    """A server that accepts and never answers must not hang the run."""
    import torchvision

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"http://127.0.0.1:{server.getsockname()[1]}/c.tar.gz")
    monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    try:
        with pytest.raises(DataNotFoundError, match="failed"):
            build("cifar10-5", tmp_path, download=True)
    finally:
        server.close()
    assert time.perf_counter() - start < 5


def test_socket_timeout_is_restored_after_download(tmp_path, monkeypatch, no_proxy):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"http://127.0.0.1:{_closed_port()}/c.tar.gz")
    before = socket.getdefaulttimeout()
    with pytest.raises(DataNotFoundError):
        build("cifar10-5", tmp_path, download=True)
    assert socket.getdefaulttimeout() == before


# --------------------------------------------------------------------------- the whole run through the CLI
def test_cli_runs_naive_on_cifar10_fixture(tmp_path, fixtures, capsys):
    from clbench.cli import main

    fixtures.write_cifar10(tmp_path / "data")
    out = tmp_path / "results"
    rc = main([
        "run", "--strategy", "naive", "--scenario", "cifar10-5", "--data-root", str(tmp_path / "data"),
        "--backbone", "clbench_mlp_tiny", "--accelerator", "cpu", "--output-dir", str(out), "--quiet",
        "--set", "limit_train_batches=1", "epochs=1", "batch_size=4",
    ])
    assert rc == 0, capsys.readouterr().err
    files = list(out.rglob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["scenario"] == "cifar10-5" and result["status"] == "completed"
    assert result["scenario_info"]["class_order"] == list(range(10))
    assert len(result["accuracy_matrix"]) == 5 and all(len(r) == 5 for r in result["accuracy_matrix"])


def test_cli_missing_root_exits_2_without_result(tmp_path, capsys):
    from clbench.cli import main

    out = tmp_path / "results"
    rc = main([
        "run", "--strategy", "naive", "--scenario", "cifar100-10", "--data-root", str(tmp_path / "empty"),
        "--accelerator", "cpu", "--output-dir", str(out), "--quiet",
    ])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("clbench: error: CIFAR-100 not found")
    assert str(tmp_path / "empty" / "cifar-100-python") in err
    assert not out.exists() or not list(out.rglob("*.json"))


# --------------------------------------------------------------------------- augmentation
def test_pad_crop_flip_returns_shifted_or_flipped_crops():
    torch.manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.randn(16, 3, 8, 8)
    out = cifar.PadCropFlip(pad=2, mean=mean, std=std)(x)
    assert out.shape == x.shape
    black = (0 - 0.5) / 0.25
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=black)
    for i in range(len(x)):
        candidates = [
            c
            for dy in range(5)
            for dx in range(5)
            for c in (padded[i, :, dy : dy + 8, dx : dx + 8], padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1))
        ]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not all(torch.equal(out[i], x[i]) for i in range(len(x)))  # per-sample randomness


def test_brightness_jitter_scales_pixel_values_within_the_range():
    torch.manual_seed(0)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.5, 0.5)
    raw = torch.full((64, 3, 4, 4), 0.5)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = cifar.PadCropFlip(pad=0, mean=mean, std=std, brightness=0.25)(x)
    back = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    factors = back[:, 0, 0, 0] / 0.5
    assert float(factors.min()) >= 0.75 - 1e-5 and float(factors.max()) <= 1.25 + 1e-5
    assert float(factors.std()) > 0.05
    assert torch.allclose(back, back[:, :1, :1, :1].expand_as(back), atol=1e-5)  # one factor per image


def test_resized_crop_with_full_scale_is_identity_or_flip():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    out = cifar.ResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0))(x)
    for i in range(8):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(-1), atol=1e-5)


def test_resized_crop_zooms_in():
    torch.manual_seed(0)
    x = torch.arange(32.0).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()  # a horizontal ramp
    out = cifar.ResizedCropFlip(scale=(0.1, 0.2), ratio=(1.0, 1.0))(x)
    assert out.shape == x.shape
    spans = (out[:, 0, 16].max(dim=1).values - out[:, 0, 16].min(dim=1).values)
    assert float(spans.max()) < 20  # a crop of about a third of the width spans about a third of the ramp
