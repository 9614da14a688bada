"""The papers' detection input pipeline: aspect-preserving resize, padded batches with each image's
valid size, detectors that use it, AP in original-image pixels, and the run flags reaching the
detectors' Configs.

Fixture: two images of different aspect ratios written as VOC files, read with shorter side 32
and longer side at most 53 (= round(32 * 1333 / 800), what `--set image_size=32` gives):

- A, 64 x 32 (landscape): factor min(32 / 32, 53 / 64) = 0.828125 -> 53 x 27 (int(26.5 + .5));
  box factors (53 / 64, 27 / 32) = (0.828125, 0.84375).
- B, 30 x 45 (portrait): factor min(32 / 30, 53 / 45) = 16 / 15 -> 32 x 48; box factors (16/15, 16/15).

One batch of both: max 48 x 53, padded to 64 x 64 (multiples of 32).
"""

from __future__ import annotations

import pytest
import torch
from clbench.scenarios._iod_files import aspect_size, long_side_cap, write_voc
from clbench.scenarios.voc import read_voc

from clbench.datasets import PAD_VALUE, DetectionBatch, DetectionDataset, detection_collate, make_target
from clbench.errors import UsageError
from clbench.models.detection.padding import padded_batch
from clbench.types import ExperienceInfo

STAND_INS = ["aeroplane", "bus", "dog", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
SIZES = [(64, 32), (30, 45)]  # (width, height) of A and B
BOXES = [[[8.0, 4.0, 40.0, 28.0]], [[3.0, 9.0, 27.0, 36.0]]]  # whole pixels (VOC XML round-trips them)
LABELS = [[0], [7]]  # stand-in classes -> aeroplane (0), tvmonitor (19)
MEAN = torch.tensor(PAD_VALUE).view(3, 1, 1)


class _TwoSizes:
    """`load(row)` of two images of different sizes (write_voc reads them through it)."""

    def __call__(self, row: int) -> torch.Tensor:
        w, h = SIZES[row]
        g = torch.Generator().manual_seed(row)
        return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def voc_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_two")
    data = DetectionDataset(_TwoSizes(), [make_target(b, lab) for b, lab in zip(BOXES, LABELS)])
    write_voc(data, root, "trainval", STAND_INS, image_format="png")
    folder = write_voc(data, root, "test", STAND_INS, image_format="png", first_id=100)
    return read_voc(folder, "test", size=32, long=long_side_cap(32))


def test_the_papers_sizes_and_the_proportional_cap():
    assert long_side_cap(800) == 1333 and long_side_cap(32) == 53
    assert aspect_size(640, 480, 800, 1333) == (1067, 800)  # a typical COCO image: shorter side 800
    assert aspect_size(1000, 300, 800, 1333) == (1333, 400)  # a panorama: the longer side caps it
    assert aspect_size(*SIZES[0], 32, 53) == (53, 27) and aspect_size(*SIZES[1], 32, 53) == (32, 48)


def test_images_and_boxes_scale_with_their_own_aspect_ratio(voc_two):
    assert voc_two.image(0).shape == (3, 27, 53) and voc_two.image(1).shape == (3, 48, 32)
    assert torch.equal(voc_two.targets[0]["boxes"], torch.tensor([[6.625, 3.375, 33.125, 23.625]]))
    assert torch.allclose(voc_two.targets[1]["boxes"], torch.tensor([[3.2, 9.6, 28.8, 38.4]]))
    assert torch.equal(voc_two.original_scales(),
                       torch.tensor([[53 / 64, 27 / 32], [16 / 15, 48 / 45]], dtype=torch.float64))


def test_a_batch_of_two_sizes_is_padded_bottom_right_to_multiples_of_32(voc_two):
    batch = detection_collate([voc_two[0], voc_two[1]])
    assert batch.x.shape == (2, 3, 64, 64) and batch.padded
    assert batch.image_sizes.tolist() == [[27, 53], [48, 32]]
    assert torch.equal(batch.x[0, :, :27, :53], voc_two.image(0)) and torch.equal(batch.x[1, :, :48, :32], voc_two.image(1))
    normalised = (batch.x - MEAN) / torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    assert (normalised[0, :, 27:, :] == 0).all() and (normalised[0, :, :, 53:] == 0).all()  # zeros after normalisation
    assert (normalised[1, :, 48:, :] == 0).all() and (normalised[1, :, :, 32:] == 0).all()
    same = detection_collate([voc_two[0], voc_two[0]])  # one size: stacked as it is
    assert same.x.shape == (2, 3, 27, 53) and not same.padded


def test_horizontal_flip_flips_each_valid_area_only(voc_two):
    from clbench.models.detection.gfl import hflip_batch

    batch = detection_collate([voc_two[0], voc_two[1]])
    flipped = hflip_batch(batch, p=1.0)
    assert torch.equal(flipped.x[1, :, :48, :32], batch.x[1, :, :48, :32].flip(-1))
    assert torch.equal(flipped.x[1, :, :, 32:], batch.x[1, :, :, 32:])  # padding stays at the right
    assert torch.allclose(flipped.targets[1]["boxes"], torch.tensor([[32 - 28.8, 9.6, 32 - 3.2, 38.4]]))
    assert torch.equal(flipped.image_sizes, batch.image_sizes)


def test_gfl_uses_the_valid_areas_in_assignment_and_clips_to_them(voc_two):
    from clbench.models.detection.gfl import GFLConfig, TinyGFL

    torch.manual_seed(0)
    detector = TinyGFL(20, GFLConfig())
    batch = detection_collate([voc_two[0], voc_two[1]])
    out = detector(batch.x, image_sizes=batch.image_sizes)
    inside = out.valid_locations()
    assert inside is not None and not bool(inside[0].all()) and bool(inside.any(1).all())
    # stride 8, image A 27 x 53: rows 0-3 and columns 0-6 are valid (mmdetection's ceil(size / stride))
    level0 = out.levels == 0
    assert int(inside[0, level0].sum()) == 4 * 7 and int(inside[1, level0].sum()) == 6 * 4
    loss = detector.loss(out, batch.targets, channels=list(range(20)))
    assert loss.num_positives > 0 and all(torch.isfinite(v) for v in loss.terms.values())
    sum(loss.terms.values()).backward()
    # anchors outside an image's valid area are never positives
    from clbench.models.detection.gfl import atss_assign_batch, pad_targets

    gt, _, _, valid = pad_targets(batch.targets, batch.x.device)
    assigned = atss_assign_batch(detector.anchors(out), out.levels, gt, valid, 9, inside)
    assert not bool((assigned >= 0)[~inside].any())
    # the same without explicit sizes, inside the step's padded-batch context
    with padded_batch(batch.x, batch.image_sizes):
        assert torch.equal(detector(batch.x).image_sizes, batch.image_sizes)
    assert detector(batch.x).image_sizes is None  # outside it: nothing is padded
    detector.cfg = GFLConfig(score_thresh=0.0)
    for d, (h, w) in zip(detector.detect(batch.x, image_sizes=batch.image_sizes), batch.image_sizes.tolist()):
        assert len(d["boxes"]) and d["boxes"][:, 0::2].max() <= w and d["boxes"][:, 1::2].max() <= h


def test_a_gfl_strategy_step_and_detect_run_on_the_padded_batch(voc_two):
    from clbench.registry import STRATEGIES

    torch.manual_seed(0)
    cls = STRATEGIES.get("gfl_finetune")
    strategy = cls(None, 20, cfg=cls.Config(flip=True))
    strategy.on_experience_start(ExperienceInfo(0, tuple(range(20)), tuple(range(20)), 1, 1))
    batch = detection_collate([voc_two[0], voc_two[1]])
    total = strategy.total_loss(batch, 0)
    assert torch.isfinite(total)
    total.backward()
    found = strategy.detect(batch.x, [0, 19], image_sizes=batch.image_sizes)
    for d, (h, w) in zip(found, batch.image_sizes.tolist()):
        assert (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all()


def test_detr_normalises_each_image_by_its_own_valid_size(voc_two):
    from clbench.models.detection.detr import TinyDETR, detections, normalised_targets, set_loss

    batch = detection_collate([voc_two[0], voc_two[1]])
    explicit = normalised_targets(batch.targets, batch.image_sizes)
    # A: [6.625, 3.375, 33.125, 23.625] in 53 x 27 -> cx 19.875 / 53, cy 13.5 / 27, w 26.5 / 53, h 20.25 / 27
    assert torch.allclose(explicit[0]["boxes"], torch.tensor([[19.875 / 53, 0.5, 0.5, 20.25 / 27]]))
    assert torch.allclose(explicit[1]["boxes"], torch.tensor([[16.0 / 32, 24.0 / 48, 25.6 / 32, 28.8 / 48]]))
    with padded_batch(batch.x, batch.image_sizes):  # what methods passing batch.x.shape[-2:] get in a step
        assert all(torch.equal(a["boxes"], b["boxes"])
                   for a, b in zip(normalised_targets(batch.targets, batch.x.shape[-2:]), explicit))
    plain = normalised_targets(batch.targets, batch.x.shape[-2:])  # outside a step: the tensor's size
    assert torch.allclose(plain[0]["boxes"][0, 0], torch.tensor(19.875 / 64))
    # predictions come back in each image's pixels and inside its valid area
    logits = torch.zeros(2, 1, 20)
    logits[:, 0, 0] = 5.0
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 2.0, 2.0]]])
    found = detections(logits, boxes, batch.image_sizes, [0])
    assert torch.allclose(found[0]["boxes"], torch.tensor([[13.25, 6.75, 39.75, 20.25]]))
    assert torch.allclose(found[1]["boxes"], torch.tensor([[0.0, 0.0, 32.0, 48.0]]))
    # a TinyDETR step on the padded batch: padding is masked in the encoder and the cross-attention
    torch.manual_seed(0)
    model = TinyDETR(20)
    memory, pos = model.encode(batch.x, batch.image_sizes)
    assert memory.memory_padding.shape == (2, 64) and bool(memory.memory_padding[0].any())
    assert not bool(memory.memory_padding[1, :4].any()) and bool(memory.memory_padding[1, 4:8].all())  # B: 4 of 8 columns
    out = model.decode(memory, pos)
    loss = sum(set_loss(out, explicit).values())
    assert torch.isfinite(loss)
    loss.backward()


def test_a_detr_strategy_step_and_detect_run_on_the_padded_batch(voc_two):
    from clbench.registry import STRATEGIES

    torch.manual_seed(0)
    cls = STRATEGIES.get("detr_finetune")
    strategy = cls(None, 20, cfg=cls.Config(base="random"))
    strategy.on_experience_start(ExperienceInfo(0, tuple(range(20)), tuple(range(20)), 1, 1))
    batch = detection_collate([voc_two[0], voc_two[1]])
    total = strategy.total_loss(batch, 0)
    assert torch.isfinite(total)
    found = strategy.detect(batch.x, [0, 19], image_sizes=batch.image_sizes)
    for d, (h, w) in zip(found, batch.image_sizes.tolist()):
        assert len(d["boxes"]) and (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all()


def test_evaluation_compares_boxes_in_original_image_pixels(voc_two):
    from clbench.datasets import make_loader
    from clbench.tasks.detection import COCO_AP, evaluate_detection, in_original_pixels

    back = in_original_pixels(voc_two.targets, voc_two.original_scales())
    assert torch.allclose(back[0]["boxes"], torch.tensor([BOXES[0]], dtype=torch.float64))
    assert torch.allclose(back[1]["boxes"], torch.tensor([BOXES[1]], dtype=torch.float64))

    class Echo(torch.nn.Module):
        """Detects exactly the ground truth boxes of the batch it is shown (in fed pixels)."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))  # `evaluating` moves the module's parameters
            self.seen_sizes = []

        def detect(self, x, seen, image_sizes=None):
            self.seen_sizes.append(image_sizes)
            return [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
                    for t in self.batch_targets]

    echo = Echo()
    loader = make_loader(voc_two, 2, shuffle=False)
    batch = next(iter(loader))
    echo.batch_targets = batch.targets
    info = ExperienceInfo(0, (0, 19), (0, 19), 1, 1)
    row, detail = evaluate_detection(echo, loader, info, [(0, 19)], COCO_AP, device=torch.device("cpu"))
    assert echo.seen_sizes[0].tolist() == [[27, 53], [48, 32]]
    assert detail["ap_per_class"]["0"] == pytest.approx(1.0) and detail["ap_per_class"]["19"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- the run flags
def test_run_flags_reach_gfl_and_the_model_name_is_the_built_detectors(tmp_path):
    from clbench.config import RunConfig
    from clbench.registry import STRATEGIES
    from clbench.tasks.detection import DetectionTask

    task, cls = DetectionTask(), STRATEGIES.get("gfl_finetune")
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"")
    _, name, cfg = task.build_model(cls, None, RunConfig(), cls.Config())
    assert name == "tiny_gfl" and cfg == cls.Config()
    r50 = cls.Config(detector="r50_fpn", backbone_weights="none")
    _, name, cfg = task.build_model(cls, None, RunConfig(pretrained=True, download=True), r50)
    assert name == "r50_fpn_gfl" and cfg.backbone_weights == "imagenet" and cfg.download_weights
    _, _, cfg = task.build_model(cls, None, RunConfig(pretrained=True, weights=str(weights)), r50)
    assert cfg.backbone_weights == str(weights) and not cfg.download_weights
    _, _, cfg = task.build_model(cls, None, RunConfig(), r50)
    assert cfg == r50  # no flag: the Config as resolved
    with pytest.raises(UsageError, match=r"\(TinyGFL\) has no pretrained weights"):
        task.build_model(cls, None, RunConfig(pretrained=True), cls.Config())


def test_run_flags_reach_the_detr_family(tmp_path):
    from clbench.config import RunConfig
    from clbench.registry import STRATEGIES
    from clbench.tasks.detection import DetectionTask

    task = DetectionTask()
    weights = tmp_path / "base.safetensors"
    weights.write_bytes(b"")
    for strategy in ("p2iod", "detr_finetune", "cl_detr"):
        cls = STRATEGIES.get(strategy)
        _, name, cfg = task.build_model(cls, None, RunConfig(), cls.Config())
        assert name == "tiny_detr", strategy
        deformable = cls.Config(detector="deformable_detr", base="random")
        _, name, cfg = task.build_model(cls, None, RunConfig(pretrained=True, download=True), deformable)
        assert name == "deformable_detr_r50" and cfg.base == "coco" and cfg.base_download, strategy
        _, _, cfg = task.build_model(cls, None, RunConfig(pretrained=True, weights=str(weights)), deformable)
        assert cfg.base == str(weights) and not cfg.base_download
        _, _, cfg = task.build_model(cls, None, RunConfig(pretrained=True), cls.Config(base="random"))
        assert cfg.base == "shapes-pretrain"  # TinyDETR's pretrained base


def test_a_run_records_the_detector_it_built(tmp_path):
    """End to end on the two-size VOC fixture (padded batches in training and evaluation); the
    result records the detector built (GFL R50-FPN is too big for this CPU test: tiny_gfl)."""
    import json

    from clbench.cli import main

    data = DetectionDataset(_TwoSizes(), [make_target(b, lab) for b, lab in zip(BOXES, LABELS)])
    write_voc(data, tmp_path, "trainval", STAND_INS, image_format="png")
    write_voc(data, tmp_path, "test", STAND_INS, image_format="png", first_id=100)
    out = tmp_path / "out"
    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "voc-19+1", "--data-root", str(tmp_path),
                 "--set", "image_size=32", "epochs=1", "batch_size=2", "--accelerator", "cpu", "--quiet",
                 "--output-dir", str(out)])
    assert code == 0
    (path,) = out.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["backbone"] == "tiny_gfl" and result["detection"]["per_task"]


def test_deformable_detr_gets_the_pixel_mask_of_a_padded_batch(voc_two):
    pytest.importorskip("transformers")
    from clbench.models.detection.deformable_detr import DeformableDETR

    torch.manual_seed(0)
    model = DeformableDETR(20, num_queries=20).eval()
    batch = detection_collate([voc_two[0], voc_two[1]])
    with torch.no_grad():
        pixels, encoded = model.encode(batch.x, batch.image_sizes)
        mask = encoded.pixel_mask
        assert mask.shape == (2, 64, 64) and int(mask[0].sum()) == 27 * 53 and int(mask[1].sum()) == 48 * 32
        assert mask[0, :27, :53].all() and not mask[0, 27:].any() and not mask[1, :, 32:].any()
        out = model.decode(pixels, encoded)
    assert out.boxes.shape[1:3] == (2, 20) and torch.isfinite(out.logits).all()
    with padded_batch(batch.x, batch.image_sizes), torch.no_grad():  # what a method passing batch.x gets in a step
        assert torch.equal(model.encode(batch.x)[1].pixel_mask, mask)


# --------------------------------------------------------------------------- Deformable DETR's training augmentation
def _augment():
    from clbench.models.detection import augment

    return augment


def test_detr_resize_rule_by_hand():
    A = _augment()
    # 500 x 375 (VOC landscape) to shorter side 480: 480 x int(480 * 500 / 375) = 480 x 640
    assert A.shorter_side_size(375, 500, 480, 1333) == (480, 640)
    # 375 x 500 portrait to 800: the width (shorter) -> 800, the height int(800 * 500 / 375) = 1066
    assert A.shorter_side_size(500, 375, 800, 1333) == (1066, 800)
    # 200 x 1000 panorama: 1000 / 200 * 800 = 4000 > 1333 -> shorter round(1333 * 200 / 1000) = 267,
    # longer int(267 * 1000 / 200) = 1335 (DETR truncates the longer side, so it may pass the cap by rounding)
    assert A.shorter_side_size(200, 1000, 800, 1333) == (267, 1335)
    assert A.shorter_side_size(480, 640, 480, 1333) == (480, 640)  # already there: unchanged
    assert A.shorter_side_size(375, 500, 600) == (600, 800)  # the pre-crop resize has no cap
    # the loaded shorter side read back: plain, and with the longer side capped (N = 64: cap 107)
    assert A.loaded_short_side(64, 85) == 64 and A.loaded_short_side(21, 107) == 64


def test_flip_resize_and_crop_move_boxes_as_computed_by_hand():
    A = _augment()
    image = torch.rand(3, 30, 40)
    target = make_target([[4.0, 6.0, 10.0, 20.0], [30.0, 2.0, 40.0, 8.0]], [1, 2], [False, True])
    flipped, t = A.hflip(image, target)
    assert torch.equal(flipped[..., 0], image[..., 39])
    assert t["boxes"].tolist() == [[30.0, 6.0, 36.0, 20.0], [0.0, 2.0, 10.0, 8.0]]  # x -> 40 - x, swapped
    resized, t = A.resize_shorter(image, target, 15)  # 30 x 40 -> 15 x 20: every coordinate halved
    assert resized.shape == (3, 15, 20)
    assert t["boxes"].tolist() == [[2.0, 3.0, 5.0, 10.0], [15.0, 1.0, 20.0, 4.0]]
    # a 16 x 20 crop at (top 4, left 8): box 1 moves by (-8, -4) and is clipped at x = 0;
    # box 2 (x 30..40) ends at 22..32 -> clipped to 20..20: no width left, dropped with its label and flag
    cropped, t = A.crop(image, target, 4, 8, 16, 20)
    assert torch.equal(cropped, image[:, 4:20, 8:28])
    assert t["boxes"].tolist() == [[0.0, 2.0, 2.0, 16.0]]
    assert t["labels"].tolist() == [1] and t["ignore"].tolist() == [False]


def test_the_augmented_boxes_frame_the_augmented_pixels():
    """Independent of the box arithmetic: a bright rectangle drawn at the box is found, after any draw
    of flip / resize / crop / resize, inside the transformed box (to within the bilinear blur)."""
    A = _augment()
    image = torch.zeros(3, 375, 500)
    image[:, 100:260, 150:330] = 1.0  # the box 150, 100, 330, 260 in pixel edges
    target = make_target([[150.0, 100.0, 330.0, 260.0]], [4])
    generator = torch.Generator().manual_seed(0)
    shapes = set()
    for _ in range(40):
        out, t = A.augment_image(image, target, A.DETR_MULTISCALE, reference=800, generator=generator)
        mask = out[0] > 0.5
        if not len(t["boxes"]):
            assert not mask.any()  # the object was cropped away, and its box with it
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(found, t["boxes"][0], atol=1.5), (found, t["boxes"][0])
        shapes.add(tuple(out.shape[-2:]))
    assert len(shapes) > 10  # many different draws were checked


def test_detr_multiscale_draws_the_papers_sizes_and_is_seeded():
    A = _augment()
    image = torch.rand(3, 375, 500)  # a VOC image at its own size; reference 800 = the paper's scale
    target = make_target([[10.0, 10.0, 490.0, 365.0]], [0])
    generator = torch.Generator().manual_seed(1)
    shorter, longer = set(), set()
    for _ in range(200):
        out, _ = A.augment_image(image, target, A.DETR_MULTISCALE, reference=800, generator=generator)
        shorter.add(min(out.shape[-2:]))
        longer.add(max(out.shape[-2:]))
    assert shorter <= set(range(480, 801, 32)) and len(shorter) >= 9  # after a crop the aspect varies
    assert max(longer) <= 1333 + 2  # the cap (DETR's truncation may overshoot by rounding)
    # image_size=64: the same draws at 64/800 of the size
    small, _ = A.augment_image(torch.rand(3, 64, 85), target, A.DETR_MULTISCALE, generator=torch.Generator().manual_seed(2))
    assert min(small.shape[-2:]) in {round(s * 64 / 800) for s in range(480, 801, 32)}

    def draw(seed):
        torch.manual_seed(seed)  # the global generator, as a run seeds it
        return A.augment_image(image, target, A.DETR_MULTISCALE)

    (a, ta), (b, tb), (c, _) = draw(5), draw(5), draw(6)
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert a.shape != c.shape or not torch.equal(a, c)


def test_a_padded_batch_is_augmented_per_valid_area_and_padded_again(voc_two):
    A = _augment()
    batch = detection_collate([voc_two[0], voc_two[1]])
    torch.manual_seed(0)
    out = A.augment_batch(batch, A.DETR_MULTISCALE)
    assert A.augment_batch(batch, None) is batch
    for b, (h, w) in enumerate(out.image_sizes.tolist()):
        assert out.x.shape[-2] % 32 == 0 and out.x.shape[-1] % 32 == 0
        assert torch.allclose(out.x[b, :, h:, :], MEAN.expand(3, out.x.shape[-2] - h, out.x.shape[-1]))
        boxes = out.targets[b]["boxes"]
        assert bool((boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all())


def test_paper_settings_turn_the_augmentation_on_for_deformable_detr_only():
    from clbench.engine.runner import RunSpec, resolve

    assert resolve(RunSpec("p2iod", "voc-10+10", paper_settings=True))[1].train_augment == "detr_multiscale"
    assert resolve(RunSpec("cl_detr", "coco-40+40", paper_settings=True))[1].train_augment == "detr_multiscale"
    assert resolve(RunSpec("cl_detr", "shapes-2+2"))[1].train_augment == "none"
    with pytest.raises(UsageError, match="train_augment='flip'"):
        resolve(RunSpec("detr_finetune", "shapes-2+2", strategy_overrides={"train_augment": "flip"}))


def test_a_detr_step_trains_on_the_augmented_batch(voc_two, monkeypatch):
    from clbench.strategies.detr_finetune import DetrFinetune

    strategy = DetrFinetune(None, 20, DetrFinetune.Config(base="random", train_augment="detr_multiscale"), seed=0)
    strategy.on_experience_start(ExperienceInfo(0, tuple(range(20)), tuple(range(20)), 20, 20))
    seen = []
    original = strategy.step_losses
    monkeypatch.setattr(strategy, "step_losses", lambda batch: seen.append(batch) or original(batch))
    batch = detection_collate([voc_two[0], voc_two[1]])
    torch.manual_seed(3)
    strategy.total_loss(batch, 0)
    torch.manual_seed(3)
    expected = _augment().augment_batch(batch, _augment().DETR_MULTISCALE)
    assert torch.equal(seen[0].x, expected.x) and torch.equal(seen[0].image_sizes, expected.image_sizes)
