"""CUB-200-2011 in 10 experiences of 20 classes, as in PILOT's pre-trained-model CIL benchmarks.

Files: `<data root>/CUB_200_2011/` as extracted from the official archive: `images/`,
`images.txt` (id, relative path), `train_test_split.txt` (id, 1 = train),
`image_class_labels.txt` (id, class 1..200) and `classes.txt` (class, name).  The
official split is used (5,994 train / 5,794 test images); images are read per item.
Protocol as ImageNet-R (PILOT): 224 px, RandomResizedCrop(0.05-1) + flip, pixels in
[0, 1], ViT-B/16, classes shuffled with numpy seed 1993.
"""

from __future__ import annotations

from pathlib import Path

from clbench.scenarios import _files
from clbench.scenarios._images import image_folder_scenario
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    data_root,
    seeded_permutation,
    split_increments,
)
from clbench.scenarios.imagenet_r import PILOT

from clbench.errors import UsageError
from clbench.registry import register_scenario

URL = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"
FOLDER = "CUB_200_2011"
INDEX_FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")
NUM_CLASSES = 200


@register_scenario("cub-10")
def cub_10(options: ScenarioOptions) -> Scenario:
    """CUB-200-2011, 10 experiences x 20 classes (PILOT: seed-1993 order, 224 px, ViT-B/16)."""
    root = data_root(options)
    train, test, names = read(root / FOLDER, how=f"download {URL} and extract it into {root}")
    return image_folder_scenario(
        "cub-10",
        options,
        PILOT,
        train,
        test,
        increments=split_increments(NUM_CLASSES, 10),
        class_names=names,
        paper_order=seeded_permutation(NUM_CLASSES, 1993),
        meta={"source": "CUB-200-2011 (official train_test_split.txt)", "paper_class_order": "numpy seed 1993 permutation (PILOT)"},
    )


def read(folder: Path, *, how: str):
    """((train paths, labels), (test paths, labels), class names); labels are class id - 1."""
    _files.require(folder, [*INDEX_FILES, "images"], dataset="CUB-200-2011", how=how)
    paths = _by_id(folder / "images.txt", how)
    is_train = _by_id(folder / "train_test_split.txt", how)
    classes = _by_id(folder / "image_class_labels.txt", how)
    names_by_id = _by_id(folder / "classes.txt", how)
    for file, table in (("train_test_split.txt", is_train), ("image_class_labels.txt", classes)):
        if table.keys() != paths.keys():
            odd = sorted(table.keys() ^ paths.keys())[:5]
            raise UsageError(f"{folder / file} and images.txt list different image ids (e.g. {odd}); {how}")
    try:
        names = [names_by_id[str(c)] for c in range(1, NUM_CLASSES + 1)]
    except KeyError as e:
        raise UsageError(f"{folder / 'classes.txt'} has no class {e.args[0]}; expected ids 1..{NUM_CLASSES}; {how}") from None

    train, test = ([], []), ([], [])
    for image_id, rel in paths.items():
        flag, cls = is_train[image_id], classes[image_id]
        if flag not in ("0", "1"):
            raise UsageError(f"{folder / 'train_test_split.txt'} gives image {image_id} the flag {flag!r}, expected 0 or 1; {how}")
        if not cls.isdigit() or not 1 <= int(cls) <= NUM_CLASSES:
            raise UsageError(f"{folder / 'image_class_labels.txt'} gives image {image_id} the class {cls!r}, expected 1..{NUM_CLASSES}; {how}")
        part = train if flag == "1" else test
        part[0].append(str(folder / "images" / rel))
        part[1].append(int(cls) - 1)
    missing = [p for p in train[0] + test[0] if not Path(p).is_file()]
    if missing:  # fail now, not mid-training (a stat per image is cheap next to reading them)
        raise _files.missing_error(folder / "images", [str(Path(p).relative_to(folder / "images")) for p in missing], dataset="CUB-200-2011", how=how)
    return train, test, names


def _by_id(path: Path, how: str) -> dict[str, str]:
    rows = _files.read_table(path, 2, how=how)
    table = {row[0]: row[1] for row in rows}
    if len(table) != len(rows):
        raise UsageError(f"{path} repeats an id; {how}")
    return table
