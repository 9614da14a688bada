"""Tiny-ImageNet, ImageNet-R, CUB-200-2011 and ImageNet-Subset on fixtures in their real layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from clbench.scenarios import _images
from clbench.scenarios.base import ScenarioOptions

from clbench.datasets import dataset_labels, make_loader
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS

PILOT_200_ORDER_HEAD = [168, 136, 51, 9, 183, 101, 171, 99]  # numpy seed 1993 permutation of 200


@pytest.fixture(scope="module")
def root(tmp_path_factory, fixtures):
    from clbench.scenarios.imagenet_subset import subset_wnids

    root = tmp_path_factory.mktemp("data")
    fixtures.write_tinyimagenet(root)
    fixtures.write_imagenet_r(root)
    fixtures.write_cub(root)
    fixtures.write_imagenet_subset(root, subset_wnids())
    return root


def build(name, root, **options):
    return SCENARIOS.get(name)(ScenarioOptions(data_root=str(root), **options))


def check_labels(s, fixtures, split, n=40):
    """Every loaded image carries the original label that its class-order position names."""
    batch = next(iter(make_loader(split, n, shuffle=False)))
    for x, y in zip(batch.x, batch.y):
        assert fixtures.decode_label(x, s.mean, s.std) == s.class_order[int(y)]
    return batch


@pytest.mark.parametrize(
    "name, increments, shape",
    [
        ("tinyimagenet-10", [20] * 10, (3, 64, 64)),
        ("imagenet-r-10", [20] * 10, (3, 224, 224)),
        ("cub-10", [20] * 10, (3, 224, 224)),
        ("imagenet-subset-10", [10] * 10, (3, 224, 224)),
        ("imagenet-subset-b50-5", [50] + [10] * 5, (3, 224, 224)),
        ("imagenet-subset-b50-10", [50] + [5] * 10, (3, 224, 224)),
    ],
)
def test_experiences_partition_classes_and_keep_labels(root, fixtures, name, increments, shape):
    s = build(name, root)
    assert s.increments == increments and s.input_shape == shape
    seen: set[int] = set()
    for i in range(s.num_experiences):
        expected = set(s.experience_classes(i))
        assert set(dataset_labels(s.train_sets[i]).tolist()) == expected
        assert set(dataset_labels(s.test_sets[i]).tolist()) == expected
        assert not expected & seen
        seen |= expected
    assert seen == set(range(s.num_classes))
    batch = check_labels(s, fixtures, s.test_sets[-1], n=8)
    assert batch.x.shape[1:] == shape and batch.x.dtype == torch.float32


def test_building_reads_no_image(root, monkeypatch):
    opened = []
    real = _images.open_rgb
    monkeypatch.setattr(_images, "open_rgb", lambda p: opened.append(p) or real(p))
    s = build("imagenet-r-10", root, image_size=32)
    assert opened == []
    s.train_sets[3][0]
    assert len(opened) == 1 and isinstance(s.train_sets[3].dataset, _images.ImageFiles)


def test_tinyimagenet_reads_val_annotations_and_sorts_wnids(root, fixtures):
    s = build("tinyimagenet-10", root)
    wnids = sorted(fixtures.imagenet_r_wnids())
    assert s.class_order == list(range(200)) and s.class_names == wnids  # natural (Mammoth), wnids.txt is unsorted
    assert sum(len(d) for d in s.test_sets) == 200  # one val image per class, labelled by val_annotations.txt
    for split in (s.train_sets[0], s.test_sets[0], s.test_sets[9]):
        check_labels(s, fixtures, split)
    assert s.mean == pytest.approx((0.4802, 0.4480, 0.3975))


def test_paper_orders(root):
    r = build("imagenet-r-10", root, image_size=32)
    assert r.class_order[:8] == PILOT_200_ORDER_HEAD
    assert build("cub-10", root, image_size=32, class_order="paper").class_order == r.class_order
    assert build("cub-10", root, image_size=32, class_order="natural").class_order == list(range(200))
    sub = build("imagenet-subset-10", root, image_size=32)
    assert sub.class_names[:3] == ["n02396427", "n04141975", "n02834397"]  # eTag's labels 0, 1, 2
    assert sub.class_names != sorted(sub.class_names)
    nat = build("imagenet-subset-10", root, image_size=32, class_order="natural")
    assert nat.class_names == sorted(sub.class_names)


@pytest.mark.parametrize("name", ["tinyimagenet-10", "imagenet-r-10", "cub-10", "imagenet-subset-10"])
def test_seeded_class_order_is_deterministic(root, name):
    a = build(name, root, image_size=16, class_order="seed:5")
    b = build(name, root, image_size=16, class_order="seed:5")
    c = build(name, root, image_size=16, class_order="seed:6")
    assert a.class_order == b.class_order != c.class_order
    for da, db in zip(a.train_sets, b.train_sets):
        assert torch.equal(da.indices, db.indices) and torch.equal(da.targets, db.targets)


def test_cub_uses_the_official_split_and_names(root, fixtures):
    s = build("cub-10", root, image_size=32, class_order="natural")
    assert sum(len(d) for d in s.train_sets) == 200 and sum(len(d) for d in s.test_sets) == 200
    assert s.class_names[0] == "001.Bird_1" and s.class_names[199] == "200.Bird_200"
    train_files = {Path(p).name for d in s.train_sets for p in d.dataset.paths[d.indices.numpy()]}
    assert all("_0000_" in f for f in train_files)  # train_test_split.txt marks image 0 of each class as train
    check_labels(s, fixtures, s.train_sets[4])
    assert s.mean == (0.0, 0.0, 0.0) and s.std == (1.0, 1.0, 1.0)  # PILOT: pixels in [0, 1]


def test_imagenet_r_pre_split_layout(tmp_path, fixtures):
    fixtures.write_imagenet_r(tmp_path, per_class=2, presplit=True)
    s = build("imagenet-r-10", tmp_path, image_size=32)
    assert sum(len(d) for d in s.train_sets) == 200 and sum(len(d) for d in s.test_sets) == 200
    assert "train/ and test/" in s.meta["source"]
    check_labels(s, fixtures, s.test_sets[2])


def test_imagenet_r_split_is_fixed_and_disjoint(tmp_path, fixtures):
    fixtures.write_imagenet_r(tmp_path, per_class=5)
    a = build("imagenet-r-10", tmp_path, image_size=32)
    b = build("imagenet-r-10", tmp_path, image_size=32, class_order="seed:1")
    paths = lambda s, sets: {str(p) for d in sets for p in d.dataset.paths[d.indices.numpy()]}  # noqa: E731
    assert len(paths(a, a.train_sets)) == 800 and len(paths(a, a.test_sets)) == 200  # 4 + 1 per class
    assert not paths(a, a.train_sets) & paths(a, a.test_sets)
    assert paths(a, a.test_sets) == paths(b, b.test_sets)  # the split does not depend on the run


# --------------------------------------------------------------------------- missing and corrupt data
@pytest.mark.parametrize(
    "name, folder, expected, hint",
    [
        ("tinyimagenet-10", "tiny-imagenet-200", "wnids.txt", "tiny-imagenet-200.zip"),
        ("imagenet-r-10", "imagenet-r", "200 class folders", "imagenet-r.tar"),
        ("cub-10", "CUB_200_2011", "images.txt", "CUB_200_2011.tgz"),
        ("imagenet-subset-10", "imagenet/train", "100 class folders such as n0", "valprep.sh"),
    ],
)
def test_missing_root_names_directory_files_and_source(tmp_path, name, folder, expected, hint):
    with pytest.raises(DataNotFoundError) as e:
        build(name, tmp_path)
    msg = str(e.value)
    assert f"looked in {tmp_path / folder} for" in msg and expected in msg and hint in msg and "\n" not in msg


def test_truncated_image_is_an_error_naming_it(tmp_path, fixtures):
    fixtures.write_imagenet_r(tmp_path)
    s = build("imagenet-r-10", tmp_path, image_size=32)
    path = Path(str(s.test_sets[0].dataset.paths[int(s.test_sets[0].indices[0])]))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UsageError, match=f"image {path} is unreadable or truncated"):
        s.test_sets[0][0]


def test_tinyimagenet_unknown_val_wnid(tmp_path, fixtures):
    folder = fixtures.write_tinyimagenet(tmp_path)
    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UsageError, match=r"val_annotations.txt row 201 names wnid 'n00000000'"):
        build("tinyimagenet-10", tmp_path)


def test_tinyimagenet_missing_class_folder(tmp_path, fixtures):
    folder = fixtures.write_tinyimagenet(tmp_path)
    gone = sorted(fixtures.imagenet_r_wnids())[7]
    shutil.rmtree(folder / "train" / gone)
    with pytest.raises(DataNotFoundError, match=f"train/{gone}/images"):
        build("tinyimagenet-10", tmp_path)


def test_imagenet_r_with_a_class_missing(tmp_path, fixtures):
    folder = fixtures.write_imagenet_r(tmp_path)
    shutil.rmtree(folder / fixtures.imagenet_r_wnids()[0])
    with pytest.raises(UsageError, match="holds 199 class folders, expected 200"):
        build("imagenet-r-10", tmp_path)


def test_cub_inconsistent_index_files(tmp_path, fixtures):
    folder = fixtures.write_cub(tmp_path)
    labels = folder / "image_class_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(UsageError, match="image_class_labels.txt and images.txt list different image ids"):
        build("cub-10", tmp_path)


def test_cub_malformed_line(tmp_path, fixtures):
    folder = fixtures.write_cub(tmp_path)
    (folder / "train_test_split.txt").write_text("1 1\n2\n")
    with pytest.raises(UsageError, match="train_test_split.txt line 2 is malformed"):
        build("cub-10", tmp_path)


def test_cub_missing_image(tmp_path, fixtures):
    folder = fixtures.write_cub(tmp_path)
    (folder / "images" / "050.Bird_50" / "Bird_50_0001_100.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="050.Bird_50/Bird_50_0001_100.jpg"):
        build("cub-10", tmp_path)


def test_imagenet_flat_val_folder_is_explained(tmp_path, fixtures):
    from clbench.scenarios.imagenet_subset import subset_wnids

    folder = fixtures.write_imagenet_subset(tmp_path, subset_wnids())
    shutil.rmtree(folder / "val")
    (folder / "val").mkdir()
    shutil.copy(next((folder / "train").rglob("*.JPEG")), folder / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataNotFoundError, match="sorted into class folders"):
        build("imagenet-subset-10", tmp_path)


def test_subset_list_is_etags_derivation():
    """The shipped list is the classes with p[v] < 100, p = seed-1993 permutation of the 1,000 sorted wnids."""
    from importlib.resources import files

    import numpy as np
    from clbench.scenarios.imagenet_subset import subset_wnids

    all_wnids = files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text().split()
    p = np.random.RandomState(1993).permutation(1000)
    listed = subset_wnids()
    assert len(listed) == len(set(listed)) == 100
    assert [p[sorted(all_wnids).index(w)] for w in listed] == list(range(100))
