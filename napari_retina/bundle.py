"""Training bundles: the graders' labels and the exact training command, for a GPU server ("Train elsewhere").

A bundle is a self-contained folder:

    <bundle>/
        data/                    flat layout: <stem>.<ext> and <stem>_<LESION>.tif per label
        data/labels.json         which lesions of which image are labels (the rest are left out)
        train.sh                 the exact `python -m training ...` command (and its torchrun form)
        README.txt               what to do with it, and how to bring the model back

Labels follow `session.graders_masks`: a reviewed lesion of an annotation project is the
grader's own pixels there, otherwise the data set's ground truth; a lesion with neither has no
file and is not listed. Every label is written, empty ones too, and `labels.json` names them,
so on the server a lesion without a file is never mistaken for "no lesion". Headless: the CLI,
the train dock and tests share it.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from .io.atomic import atomic_write_text
from .io.datasets import LABELS_MANIFEST, open_dataset
from .io.errors import RetinaInputError
from .io.images import image_shape
from .io.masks import write_mask


def write_bundle(data_folders: list[str | Path], out: str | Path, lesions: list[str], recipe_args: list[str],
                 progress=None) -> dict:
    """Write a training bundle to `out` (created, must not hold anything yet); returns a summary.

    `recipe_args`: `python -m training` arguments without --data/--out (e.g. ["exudates",
    "--epochs", "50"]); the bundle's command trains on its own data into `runs/model`.
    """
    from .session import graders_masks

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RetinaInputError(f"{out}: not empty; choose a new folder for the bundle")
    records = []
    for folder in data_folders:
        ds = open_dataset(folder)
        if ds is None:
            raise RetinaInputError(f"{folder}: no fundus images found")
        records += ds.records
    seen: set[str] = set()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[str]] = {}
    counts = {"images": 0, "labels": 0, "left_out": 0}
    for k, rec in enumerate(records, 1):
        if rec.stem in seen:
            raise RetinaInputError(f"image {rec.stem} appears twice in the data folders")
        seen.add(rec.stem)
        if progress:
            progress(k, len(records), rec.stem)
        shape = image_shape(rec.image)
        labels = graders_masks(rec, lesions, shape)
        kept = [code for code in lesions if labels[code] is not None]
        counts["left_out"] += len(lesions) - len(kept)
        if not kept:
            continue  # nothing to learn from this image
        shutil.copy2(rec.image, data / rec.image.name)
        for code in kept:
            write_mask(data / f"{rec.stem}_{code}.tif", labels[code])
        manifest[rec.stem] = kept
        counts["images"] += 1
        counts["labels"] += len(kept)
    atomic_write_text(data / LABELS_MANIFEST, json.dumps({"format": 1, "labels": manifest}, indent=1) + "\n")
    cmd = ["python", "-m", "training", *recipe_args, "--data", "data", "--out", "runs/model"]
    recipe, rest = recipe_args[0], recipe_args[1:]
    ddp = ["torchrun", "--nproc_per_node", "N_GPUS", "-m", "training", recipe, *rest, "--data", "data", "--out", "runs/model"]
    atomic_write_text(out / "train.sh", "#!/bin/sh\n# one GPU (or the CPU):\n" + shlex.join(cmd) + "\n"
                      "# several GPUs on this machine (replace N_GPUS):\n# " + shlex.join(ddp) + "\n")
    (out / "train.sh").chmod(0o755)
    atomic_write_text(out / "README.txt", f"""napari-retina training bundle

{counts['images']} images, {counts['labels']} image-lesion labels ({', '.join(lesions)}); {counts['left_out']} image-lesion
pairs had no label (not reviewed, no ground truth) and were left out. data/labels.json names the labels.

On a machine with napari-retina's `training` package (a checkout works: PYTHONPATH=CHECKOUT) and torch:

    sh train.sh

The model folder is written to runs/model (weights.safetensors, config.json, card.md). Bring it back
with "Import model..." in napari's Retrain models dock; its checksum is checked there.
""")
    return {"bundle": str(out), **counts, "command": shlex.join(cmd)}
