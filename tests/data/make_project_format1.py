"""Writes tests/data/project_format1/: an annotation project folder as napari-retina 0.x wrote it
before the masks on disk held confirmed pixels only (proposal table "format": 1, each
`<stem>_<LESION>.tif` holding the pixels SHOWN: the grader's own plus pending proposals).

It was run once, at commit b108c70 (the last writer of that form), with
`.venv/bin/python tests/data/make_project_format1.py`; the files it wrote are committed and
tests/test_project_migration.py reads them. `expected.npz` holds, per lesion, what that
version read back: `shown_<LESION>` (the masks) and `hand_<LESION>` (record.hand), plus the
claims of each pending proposal (`claim_<id>`). Running it on a later version writes the new
form instead, so it is kept only as the record of how the fixture was made.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from napari_retina.io.project import Annotation, ProjectFolder  # noqa: E402
from napari_retina.lesions import LESION_CODES  # noqa: E402

H, W = 24, 32


def main() -> None:
    out = HERE / "project_format1"
    shutil.rmtree(out, ignore_errors=True)
    work = HERE / "_tmp_eye.retina"
    shutil.rmtree(work, ignore_errors=True)
    yy, xx = np.mgrid[:H, :W]
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[(yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= (0.45 * W) ** 2] = (170, 70, 30)
    img = HERE / "_tmp_eye.png"
    Image.fromarray(rgb).save(img)
    proj = ProjectFolder.create(work, img, grader="kim")
    ann = Annotation.empty("_tmp_eye.png", (H, W))
    rec = ann.record
    # EX: a hand blob, a probability proposal over it (pending) with one erased pixel,
    # a second proposal accepted
    ann.masks["EX"][3:6, 3:6] = True
    prob = np.clip(1.0 - np.hypot(yy[2:10, 4:14] - 6, xx[2:10, 4:14] - 9) / 4.5, 0, 1).astype(np.float32)
    p1, _ = rec.propose("EX", (2, 10, 4, 14), prob=prob, threshold=0.3,
                        description={"kind": "model", "model": "exudates", "version": "a", "tile": [0, 0]})
    er = np.zeros((H, W), bool)
    er[6, 9] = True
    rec.hand_edit("EX", (0, H, 0, W), erased=er)
    p2, _ = rec.propose("EX", (15, 19, 20, 26), mask=np.ones((4, 6), bool),
                        description={"kind": "model", "model": "refiner", "version": "1", "ellipse_id": "e1"})
    rec.accept(ids=[p2.id])
    # HE: hand only, no proposal
    ann.masks["HE"][18:21, 2:6] = True
    # MA: one candidate accepted, one rejected, one pending; a hand pixel painted over the pending one
    cands = []
    for (r, c) in [(4, 24), (12, 28), (20, 12)]:
        pr = np.zeros((3, 3), np.float32)
        pr[1, 1], pr[0, 1] = 0.9, 0.6
        p, _ = rec.propose("MA", (r - 1, r + 2, c - 1, c + 2), prob=pr, threshold=0.5,
                           description={"kind": "model", "model": "microaneurysms", "version": "b",
                                        "candidate": True, "centre": [r, c], "score": 0.9})
        cands.append(p)
    rec.decide(cands[0].id, "accepted")
    rec.decide(cands[1].id, "rejected")
    st = np.zeros((H, W), bool)
    st[19, 12] = True
    rec.hand_edit("MA", (0, H, 0, W), painted=st)
    ann.set_reviewed("EX", grader="kim")
    ann.set_reviewed("MA", grader="kim")
    ann.set_reviewed("HE", grader="kim")
    proj.save(ann, rgb=rgb, fov_area_px=400, grader="kim")

    back = ProjectFolder(work).load()
    expected = {}
    for c in LESION_CODES:
        assert np.array_equal(back.masks[c], ann.masks[c]), c
        assert np.array_equal(back.record.hand(c), rec.hand(c)), c
        expected[f"shown_{c}"] = back.masks[c]
        expected[f"hand_{c}"] = back.record.hand(c)
    for p in back.record.proposals.values():
        expected[f"claim_{p.id}"] = p.claim()
    out.mkdir()
    for f in sorted(work.rglob("*")):
        if f.is_file():
            target = out / f.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            name = target.name.replace("_tmp_eye", "eye")
            shutil.copyfile(f, target.with_name(name))
    with open(out / "expected.npz", "wb") as f:
        np.savez_compressed(f, **expected)
    # the image's name is written in provenance.json and ellipses.json too
    for name in ("provenance.json", "ellipses.json"):
        p = out / name
        p.write_text(p.read_text().replace("_tmp_eye", "eye"))
    shutil.rmtree(work)
    img.unlink()
    print(sorted(str(p.relative_to(out)) for p in out.rglob("*")))


if __name__ == "__main__":
    main()
