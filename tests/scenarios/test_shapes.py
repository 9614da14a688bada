"""ShapesIOD: the generator (determinism, tight boxes, co-occurrence knob) and the
protocol's filter checks on the registered `shapes-*` scenarios."""

from __future__ import annotations

import pytest
import torch
from clbench.scenarios._detection import detection_scenario
from clbench.scenarios.shapes import (
    SHAPES_CLASSES,
    SIDE_RANGE,
    draw_shapes,
    generate_shapes,
    pool_size,
)

from clbench.config import RunConfig
from clbench.engine.runner import create_scenario
from clbench.errors import UsageError


@pytest.fixture(scope="module")
def two_plus_two():
    return create_scenario("shapes-2+2"), create_scenario("shapes-2+2-absent")


@pytest.fixture(scope="module")
def pool_2_2(two_plus_two):
    """The 2+2 training pool with every object labelled, regenerated from the recorded seed."""
    meta = two_plus_two[0].meta
    return generate_shapes(meta["pool_size"], meta["image_size"], 4, seed=meta["pool_seed"])


def _labels(target) -> set[int]:
    return set(target["labels"].tolist())


def test_same_seed_gives_identical_pixels_and_boxes_and_another_seed_does_not():
    a, b, c = generate_shapes(40, seed=5), generate_shapes(40, seed=5), generate_shapes(40, seed=6)
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 3, 64, 64)
    assert torch.equal(a.images, b.images)
    for ta, tb in zip(a.targets, b.targets):
        assert all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "ignore"))
    assert not torch.equal(a.images, c.images)


def test_every_box_tightly_bounds_the_pixels_drawn_for_its_object():
    drawing = draw_shapes(60, size=64, seed=1)
    sizes = []
    for image, target, masks in zip(drawing.dataset.images, drawing.dataset.targets, drawing.masks):
        assert 1 <= len(target["labels"]) <= 3 and len(masks) == len(target["labels"])
        assert not target["ignore"].any()
        painted_later = torch.zeros(64, 64, dtype=torch.bool)
        for k in reversed(range(len(masks))):  # later objects are painted over earlier ones
            ys, xs = masks[k].nonzero(as_tuple=True)
            box = target["boxes"][k].tolist()
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            # the visible part of the object is one flat colour
            visible = masks[k] & ~painted_later
            colours = image[:, visible].T.unique(dim=0)
            assert len(colours) == 1, f"object {k} shows {len(colours)} colours"
            painted_later |= masks[k]
            sizes.append(max(box[2] - box[0], box[3] - box[1]))
    assert SIDE_RANGE[0] * 64 - 1 <= min(sizes) and max(sizes) <= SIDE_RANGE[1] * 64 + 1


def test_single_object_images_box_equals_the_pixels_that_differ_from_the_background():
    """Without masks: pixels of the object's colour, found from the image alone."""
    drawing = draw_shapes(40, seed=2)
    checked = 0
    for image, target in zip(drawing.dataset.images, drawing.dataset.targets):
        if len(target["labels"]) != 1:
            continue
        x0, y0, x1, y1 = (int(v) for v in target["boxes"][0])
        colour = image[:, (y0 + y1) // 2, x0:x1].T.unique(dim=0, return_counts=True)
        flat = colour[0][colour[1].argmax()]  # the object's colour: the most frequent on its middle row
        ys, xs = (image == flat.view(3, 1, 1)).all(0).nonzero(as_tuple=True)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x0, y0, x1, y1]
        checked += 1
    assert checked >= 5


def test_colour_cue_off_keeps_the_layout_and_changes_the_colours():
    cue, plain = generate_shapes(20, seed=3), generate_shapes(20, seed=3, color_cue=False)
    for a, b in zip(cue.targets, plain.targets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(cue.images, plain.images)


def test_p_mix_one_keeps_every_image_inside_one_task_group():
    groups = [[0, 1], [2, 3]]
    data = generate_shapes(80, num_classes=4, seed=0, p_mix=1.0, task_classes=groups)
    assert all(_labels(t) <= set(g) for t in data.targets for g in [next(g for g in groups if _labels(t) & set(g))])
    mixed = generate_shapes(80, num_classes=4, seed=0)
    assert any(_labels(t) & {0, 1} and _labels(t) & {2, 3} for t in mixed.targets)


def test_standard_filter_card_check_1(two_plus_two, pool_2_2):
    standard, _ = two_plus_two
    pool = pool_2_2
    assert standard.class_names == list(SHAPES_CLASSES[:4]) and standard.increments == [2, 2]
    for t, task in enumerate(standard.train_sets):
        current = set(standard.experience_classes(t))
        for target in task.targets:
            assert _labels(target) <= current and len(target["labels"]) >= 1
        expected = sum(1 for target in pool.targets if _labels(target) & current)
        assert len(task) == expected
        # the images are the pool's own pixels, not copies of other images
        row = task.rows[0]
        assert torch.equal(task.images[row], pool.images[row])


def test_absent_filter_card_check_2_and_task_sizes(two_plus_two, pool_2_2):
    standard, absent = two_plus_two
    pool = pool_2_2
    assert [len(d) for d in absent.train_sets][0] == len(standard.train_sets[0])  # task 1 is built the standard way
    assert all(len(d) >= 100 for d in absent.train_sets)
    old = set(absent.experience_classes(0))
    for row in absent.train_sets[1].rows:
        assert not _labels(pool.targets[row]) & old
    assert len(absent.train_sets[1]) < len(standard.train_sets[1])


def test_absent_filter_keeps_future_objects_in_a_four_task_split():
    pool = generate_shapes(200, num_classes=8, seed=4)
    test = generate_shapes(10, num_classes=8, seed=5)
    s = detection_scenario("shapes-small", pool, test, increments=[2, 2, 2, 2], class_names=list(SHAPES_CLASSES),
                           setting="absent", input_shape=(3, 64, 64))
    futures = 0
    for t, task in enumerate(s.train_sets):
        earlier = set(range(2 * t))
        current = set(s.experience_classes(t))
        for row, target in zip(task.rows, task.targets):
            original = _labels(pool.targets[row])
            assert not original & earlier and original & current and _labels(target) <= current
            futures += bool(original - current)
    assert futures > 0, "no image with a future-class object was kept"


def test_test_set_is_another_seed_with_every_class_labelled(two_plus_two):
    standard, _ = two_plus_two
    assert standard.meta["test_seed"] != standard.meta["pool_seed"]
    assert len(standard.test_set) == 100
    labels = set().union(*standard.test_set.label_sets)
    assert labels == {0, 1, 2, 3}
    assert standard.convention.metric == "AP50"


def test_pool_is_sized_for_the_absent_setting_and_image_size_is_an_option():
    assert pool_size([2, 2]) == 600  # the 600-image pool for 2+2
    assert pool_size([7, 1]) > pool_size([4, 4])  # one new class of eight is rarely alone
    small = create_scenario("shapes-2+2-absent", RunConfig(image_size=32))
    assert small.input_shape == (3, 32, 32) and small.test_set.images.shape[-1] == 32
    assert small.meta["image_size"] == 32
    with pytest.raises(UsageError, match="fixed class order"):
        create_scenario("shapes-2+2", RunConfig(class_order="seed:1"))
