"""ShapesIOD: a tiny synthetic incremental-detection benchmark that runs on a CPU in seconds.

Eight filled or hollow shapes (`SHAPES_CLASSES`, the class order) on a noisy background with
a random colour gradient, 1-3 objects per image. One training pool is generated and the
tasks are cut from it by the same standard / absent filters as VOC and COCO, so both IOD
settings exist here and the filter code runs in every test.

Registered as `shapes-<split>` (standard setting) and `shapes-<split>-absent` (IOR's setting)
for the splits 2+2 (first 4 classes: the tests' setting), 4+4, 6+2, 7+1, 4+2+2 and 2+2+2+2,
which mirror VOC's 10+10, 15+5, 19+1, 10+5+5 and 5+5+5+5. The data is fixed by the split
(pool seed 0, test seed 1000), not by the run's seed, like a real benchmark's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from clbench.scenarios._detection import (
    DetectionScenario,
    detection_scenario,
    parse_split,
)
from clbench.scenarios._images import image_size
from clbench.scenarios._iod_files import fixed_class_order
from clbench.scenarios.base import ScenarioOptions

from clbench.datasets import DetectionDataset, make_target
from clbench.registry import register_scenario
from clbench.tasks.detection import VOC_AP50

SHAPES_CLASSES = ("disk", "square", "triangle", "cross", "ring", "diamond", "frame", "x-mark")

# saturated colours that stand out from the mid-grey background; x-mark is near black
BASE_COLOURS = np.array([
    (0.95, 0.10, 0.10),  # disk: red
    (0.15, 0.30, 1.00),  # square: blue
    (0.10, 0.85, 0.10),  # triangle: green
    (1.00, 0.95, 0.10),  # cross: yellow
    (1.00, 0.10, 1.00),  # ring: magenta
    (0.10, 1.00, 1.00),  # diamond: cyan
    (1.00, 0.55, 0.00),  # frame: orange
    (0.05, 0.05, 0.05),  # x-mark: black
], dtype=np.float32)

SIDE_RANGE = (0.19, 0.44)  # object side as a fraction of the image side
MAX_BOX_IOU = 0.1  # a placement overlapping an earlier object more than this is retried
PLACEMENT_TRIES = 30  # after that many rejected placements the object is left out
POOL_SEED, TEST_SEED = 0, 1000
TEST_IMAGES = 100
MIN_TASK_IMAGES = 100  # the absent filter must leave at least this many per task


# --------------------------------------------------------------------------- shapes as masks
# Each function gets offsets (dx, dy) of pixel centres from the object's centre and its half
# side r, all broadcastable, and says which pixels the shape covers. Bars are at least 0.45 r
# wide: thin bars were learned badly by a prototype detector at 64 px.
def _disk(dx, dy, r):
    return dx * dx + dy * dy <= r * r


def _square(dx, dy, r):
    return (dx.abs() <= r) & (dy.abs() <= r)


def _triangle(dx, dy, r):  # apex up, base at the bottom
    height = (dy + r) / (2 * r)
    return (height >= 0) & (height <= 1) & (dx.abs() <= r * height)


def _cross(dx, dy, r):
    arm = 0.3 * r
    inside = _square(dx, dy, r)
    return inside & ((dx.abs() <= arm) | (dy.abs() <= arm))


def _ring(dx, dy, r):
    d2 = dx * dx + dy * dy
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def _diamond(dx, dy, r):
    return dx.abs() + dy.abs() <= r


def _frame(dx, dy, r):
    return _square(dx, dy, r) & ~_square(dx, dy, 0.55 * r)


def _x_mark(dx, dy, r):
    reach = 0.3 * r * math.sqrt(2)  # |dx -+ dy| / sqrt(2) is the distance to a diagonal: bars 0.6 r wide
    on_diagonal = ((dx - dy).abs() <= reach) | ((dx + dy).abs() <= reach)
    return _square(dx, dy, r) & on_diagonal


SHAPE_MASKS = (_disk, _square, _triangle, _cross, _ring, _diamond, _frame, _x_mark)


# --------------------------------------------------------------------------- generation
@dataclass
class ShapesDrawing:
    """A generated set: the dataset and, per image, the boolean mask `[n_objects, S, S]` of
    every object as drawn (later objects may cover a little of earlier ones)."""

    dataset: DetectionDataset
    masks: list[torch.Tensor]


def generate_shapes(n_images: int, size: int = 64, num_classes: int = 8, seed: int = 0, color_cue: bool = True,
                    p_mix: float = 0.0, task_classes: Sequence[Sequence[int]] | None = None) -> DetectionDataset:
    """`n_images` ShapesIOD images (uint8 `[N, 3, size, size]` in memory) with every object labelled.

    Classes are the first `num_classes` of `SHAPES_CLASSES`. Each object's class is drawn
    uniformly from them; with `p_mix > 0` each image also picks a home group of
    `task_classes` (default: every class its own group) and each object comes from that group
    with probability `p_mix`, which lowers co-occurrence across tasks. `color_cue=False`
    paints every object a random colour, so only the shape tells the class. The same
    arguments give identical pixels and boxes.
    """
    return draw_shapes(n_images, size, num_classes, seed, color_cue, p_mix, task_classes, keep_masks=False).dataset


def draw_shapes(n_images: int, size: int = 64, num_classes: int = 8, seed: int = 0, color_cue: bool = True,
                p_mix: float = 0.0, task_classes: Sequence[Sequence[int]] | None = None, *,
                keep_masks: bool = True) -> ShapesDrawing:
    """`generate_shapes`, also returning each object's mask (`keep_masks`)."""
    if not 1 <= num_classes <= len(SHAPES_CLASSES):
        raise ValueError(f"num_classes={num_classes} is invalid; ShapesIOD has 1 to {len(SHAPES_CLASSES)} classes")
    if size < 16:
        raise ValueError(f"size={size} is too small: the smallest object side would be under 3 pixels")
    if not 0.0 <= p_mix <= 1.0:
        raise ValueError(f"p_mix={p_mix} is invalid; expected a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    images = _background(rng, n_images, size)
    classes = _object_classes(rng, n_images, num_classes, p_mix, task_classes)
    centres, sides = _placements(rng, classes, size)
    colours = BASE_COLOURS[np.maximum(classes, 0)] * rng.uniform(0.7, 1.0, size=classes.shape + (1,)).astype(np.float32)
    if not color_cue:  # drawn after the jitter, so the layout is the same with and without the cue
        colours = rng.uniform(0.0, 1.0, size=classes.shape + (3,)).astype(np.float32)

    pixels = torch.from_numpy(images)
    window = min(size, int(math.ceil(SIDE_RANGE[1] * size)) + 2)  # every object fits in a window this wide
    offsets = torch.arange(window)
    boxes = np.zeros(classes.shape + (4,), dtype=np.float32)
    masks = [[] for _ in range(n_images)]
    # one object slot at a time for all images at once, in drawing order, so later objects
    # are painted over earlier ones; shapes are drawn in a window around each object
    for slot in range(classes.shape[1]):
        present = torch.from_numpy(np.flatnonzero(classes[:, slot] >= 0))
        if not len(present):
            continue
        cx, cy = (torch.from_numpy(centres[present.numpy(), slot, k]) for k in (0, 1))
        r = torch.from_numpy(sides[present.numpy(), slot] / 2).view(-1, 1, 1)
        x0 = (cx - r.view(-1)).floor().long().clamp(0, size - window)
        y0 = (cy - r.view(-1)).floor().long().clamp(0, size - window)
        xs, ys = x0[:, None] + offsets, y0[:, None] + offsets  # [M, window] pixel columns / rows
        dx = (xs + 0.5 - cx[:, None]).unsqueeze(1)  # [M, 1, window]
        dy = (ys + 0.5 - cy[:, None]).unsqueeze(2)  # [M, window, 1]
        slot_classes = torch.from_numpy(classes[present.numpy(), slot])
        mask = torch.zeros(len(present), window, window, dtype=torch.bool)
        for c in slot_classes.unique().tolist():
            sel = slot_classes == c
            mask[sel] = SHAPE_MASKS[c](dx[sel], dy[sel], r[sel])
        if not bool(mask.flatten(1).any(1).all()):
            raise AssertionError("an object drew no pixel")  # sides >= 0.19 * 16 px make this impossible
        at = (present.view(-1, 1, 1), slice(None), ys.unsqueeze(2), xs.unsqueeze(1))  # -> [M, window, window, 3]
        colour = torch.from_numpy(colours[present.numpy(), slot]).view(-1, 1, 1, 3)
        pixels[at] = torch.where(mask.unsqueeze(3), colour, pixels[at])
        local = _tight_boxes(mask)
        boxes[present.numpy(), slot] = (local + torch.stack([x0, y0, x0, y0], 1)).numpy()
        if keep_masks:
            for i, m, left, top in zip(present.tolist(), mask, x0.tolist(), y0.tolist()):
                full = torch.zeros(size, size, dtype=torch.bool)
                full[top:top + window, left:left + window] = m
                masks[i].append(full)
    uint8 = (pixels * 255).round_().to(torch.uint8)
    targets = []
    for i in range(n_images):
        drawn = classes[i] >= 0
        targets.append(make_target(boxes[i][drawn], classes[i][drawn]))
    stacked = [torch.stack(m) if m else torch.zeros(0, size, size, dtype=torch.bool) for m in masks] if keep_masks else []
    return ShapesDrawing(DetectionDataset(uint8, targets), stacked)


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Per-pixel N(0.5, 0.12^2) noise plus a random linear gradient of +-0.2 per channel, in [0, 1]."""
    image = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 1)).astype(np.float32)
    amplitude = rng.uniform(-0.2, 0.2, size=(n, 3, 1, 1)).astype(np.float32)
    coord = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # -1 .. 1 across the image
    along = np.cos(angle) * coord.reshape(1, 1, 1, -1) + np.sin(angle) * coord.reshape(1, 1, -1, 1)
    along /= np.abs(np.cos(angle)) + np.abs(np.sin(angle))  # the gradient spans exactly -1 .. 1
    image *= 0.12  # in place: the pool is the largest array built here
    image += 0.5
    image += amplitude * along
    return np.clip(image, 0.0, 1.0, out=image)


def _object_classes(rng: np.random.Generator, n: int, num_classes: int, p_mix: float,
                    task_classes: Sequence[Sequence[int]] | None) -> np.ndarray:
    """`[n, 3]` class of each object slot, -1 where the image has fewer objects."""
    counts = rng.integers(1, 4, size=n)
    classes = rng.integers(0, num_classes, size=(n, 3))
    if p_mix > 0:
        groups = [list(g) for g in (task_classes or [[c] for c in range(num_classes)])]
        if any(not g or min(g) < 0 or max(g) >= num_classes for g in groups):
            raise ValueError(f"task_classes {groups} must be non-empty groups of classes below {num_classes}")
        home = rng.integers(0, len(groups), size=n)
        from_home = rng.uniform(size=(n, 3)) < p_mix
        pick = rng.uniform(size=(n, 3))
        for g, members in enumerate(groups):
            idx = np.asarray(members)[np.minimum((pick * len(members)).astype(int), len(members) - 1)]
            use = from_home & (home == g)[:, None]
            classes[use] = idx[use]
    classes[np.arange(3)[None, :] >= counts[:, None]] = -1
    return classes


def _placements(rng: np.random.Generator, classes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres `[n, 3, 2]` and sides `[n, 3]`; a candidate whose square overlaps an earlier
    object of the image with IoU above `MAX_BOX_IOU` is replaced by the next candidate, and an
    object with no acceptable candidate is dropped (its class set to -1)."""
    n = len(classes)
    sides = rng.uniform(SIDE_RANGE[0] * size, SIDE_RANGE[1] * size, size=(n, 3, PLACEMENT_TRIES)).astype(np.float32)
    free = rng.uniform(size=(n, 3, PLACEMENT_TRIES, 2)).astype(np.float32)
    centres = sides[..., None] / 2 + free * (size - sides[..., None])  # the whole square inside the image
    out_centres = np.zeros((n, 3, 2), dtype=np.float32)
    out_sides = np.zeros((n, 3), dtype=np.float32)
    for i in range(n):
        placed: list[tuple[float, float, float, float]] = []
        for slot in range(3):
            if classes[i, slot] < 0:
                continue
            for k in range(PLACEMENT_TRIES):
                s, (x, y) = float(sides[i, slot, k]), centres[i, slot, k].tolist()
                square = (x - s / 2, y - s / 2, x + s / 2, y + s / 2)
                if all(_iou(square, other) <= MAX_BOX_IOU for other in placed):
                    placed.append(square)
                    out_centres[i, slot] = (x, y)
                    out_sides[i, slot] = s
                    break
            else:
                classes[i, slot] = -1
    return out_centres, out_sides


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _tight_boxes(mask: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge bounds of each mask `[M, H, W]`: columns x0..x1 drawn give x0, x1 + 1."""
    size = mask.shape[-1]
    cols, rows = mask.any(1), mask.any(2)
    first = lambda m: m.float().argmax(1)  # noqa: E731 - first True along the axis
    last = lambda m: size - 1 - m.flip(1).float().argmax(1)  # noqa: E731
    return torch.stack([first(cols), first(rows), last(cols) + 1, last(rows) + 1], 1).float()


# --------------------------------------------------------------------------- scenarios
def pool_size(increments: Sequence[int]) -> int:
    """Training-pool size for a split: enough that every task keeps `MIN_TASK_IMAGES` images in
    the absent setting with a margin (1.5x the expected minimum), in hundreds.

    With 1-3 objects of i.i.d. uniform classes, an image lands in task t's absent set when
    no object is of an earlier class and at least one is current. The same pool serves the
    standard setting, so both settings of a split see the same images.
    """
    num_classes = sum(increments)
    start, worst = 0, 1.0
    for step in increments:
        not_old = (num_classes - start) / num_classes
        not_old_or_current = (num_classes - start - step) / num_classes
        p = sum(not_old ** k - not_old_or_current ** k for k in (1, 2, 3)) / 3
        worst, start = min(worst, p), start + step
    return int(math.ceil(1.5 * MIN_TASK_IMAGES / worst / 100) * 100)


def shapes_scenario(split: str, setting: str, options: ScenarioOptions) -> DetectionScenario:
    fixed_class_order(options.class_order, "ShapesIOD")
    increments = parse_split(split)
    num_classes = sum(increments)
    size = image_size(options.image_size, 64)
    n_pool = pool_size(increments)
    name = f"shapes-{split}" + ("-absent" if setting == "absent" else "")
    pool = generate_shapes(n_pool, size, num_classes, seed=POOL_SEED)
    test = generate_shapes(TEST_IMAGES, size, num_classes, seed=TEST_SEED)
    return detection_scenario(
        name, pool, test, increments=increments, class_names=list(SHAPES_CLASSES[:num_classes]), setting=setting,
        input_shape=(3, size, size), convention=VOC_AP50,
        meta={"source": "ShapesIOD (synthetic, generated in memory)", "image_size": size,
              "pool_size": n_pool, "pool_seed": POOL_SEED, "test_set_size": TEST_IMAGES, "test_seed": TEST_SEED,
              "objects_per_image": "1-3, classes i.i.d. uniform", "color_cue": True},
    )


@register_scenario("shapes-2+2")
def shapes_2_2(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, first 4 classes in 2 tasks of 2 (the tests' setting), standard setting."""
    return shapes_scenario("2+2", "standard", options)


@register_scenario("shapes-2+2-absent")
def shapes_2_2_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 2+2, absent setting (task 2 has no image holding a task-1 object)."""
    return shapes_scenario("2+2", "absent", options)


@register_scenario("shapes-4+4")
def shapes_4_4(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, 8 classes as 4+4 (like VOC 10+10), standard setting."""
    return shapes_scenario("4+4", "standard", options)


@register_scenario("shapes-4+4-absent")
def shapes_4_4_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 4+4, absent setting."""
    return shapes_scenario("4+4", "absent", options)


@register_scenario("shapes-6+2")
def shapes_6_2(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, 8 classes as 6+2 (like VOC 15+5), standard setting."""
    return shapes_scenario("6+2", "standard", options)


@register_scenario("shapes-6+2-absent")
def shapes_6_2_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 6+2, absent setting."""
    return shapes_scenario("6+2", "absent", options)


@register_scenario("shapes-7+1")
def shapes_7_1(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, 8 classes as 7+1 (like VOC 19+1), standard setting."""
    return shapes_scenario("7+1", "standard", options)


@register_scenario("shapes-7+1-absent")
def shapes_7_1_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 7+1, absent setting."""
    return shapes_scenario("7+1", "absent", options)


@register_scenario("shapes-4+2+2")
def shapes_4_2_2(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, 8 classes as 4+2+2 (like VOC 10+5+5), standard setting."""
    return shapes_scenario("4+2+2", "standard", options)


@register_scenario("shapes-4+2+2-absent")
def shapes_4_2_2_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 4+2+2, absent setting."""
    return shapes_scenario("4+2+2", "absent", options)


@register_scenario("shapes-2+2+2+2")
def shapes_2_2_2_2(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD, 8 classes as 2+2+2+2 (like VOC 5+5+5+5), standard setting."""
    return shapes_scenario("2+2+2+2", "standard", options)


@register_scenario("shapes-2+2+2+2-absent")
def shapes_2_2_2_2_absent(options: ScenarioOptions) -> DetectionScenario:
    """ShapesIOD 2+2+2+2, absent setting."""
    return shapes_scenario("2+2+2+2", "absent", options)
