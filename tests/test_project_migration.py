"""Project folders of older forms: read by the rule they were written with, rewritten once in the current form.

`tests/data/project_format1/` was written by the previous writer (tests/data/make_project_format1.py,
run at commit b108c70): proposal table of format 1, mask files holding the SHOWN pixels (the
grader's own plus pending proposals). Its `expected.npz` holds what that version read back.
The sources.json form (older still) is built by hand below, as that version's writer did.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import blob_mask, fundus_rgb
from napari_retina.io import project as project_module
from napari_retina.io.datasets import open_dataset
from napari_retina.io.errors import RetinaInputError
from napari_retina.io.masks import read_mask
from napari_retina.io.project import ProjectFolder, ProjectWriter
from napari_retina.lesions import LESION_CODES

FIXTURE = Path(__file__).parent / "data" / "project_format1"
H, W = 24, 32


def _expected():
    with np.load(FIXTURE / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def old_project(tmp_path):
    """A copy of the format-1 folder, as `<stem>.retina/` inside a folder of projects."""
    target = tmp_path / "projects" / "eye.retina"
    shutil.copytree(FIXTURE, target)
    (target / "expected.npz").unlink()
    return target


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_reads_like_today(ann, expected):
    for c in LESION_CODES:
        np.testing.assert_array_equal(ann.masks[c], expected[f"shown_{c}"], err_msg=f"shown {c}")
        np.testing.assert_array_equal(ann.record.hand(c), expected[f"hand_{c}"], err_msg=f"confirmed {c}")
    claims = {int(k[len("claim_"):]): v for k, v in expected.items() if k.startswith("claim_")}
    assert set(ann.record.proposals) == set(claims)
    for pid, claim in claims.items():
        np.testing.assert_array_equal(ann.record.proposals[pid].claim(), claim, err_msg=f"proposal {pid}")
    assert ann.record.proposals[1].threshold == 0.3 and ann.record.proposals[1].description["model"] == "exudates"
    assert [d["decision"] for d in ann.record.decisions] == ["accepted", "rejected"]
    for c in LESION_CODES:
        assert ann.record.check(c)


def test_the_fixture_is_of_the_older_form_with_pending_pixels_in_its_mask_files():
    # what makes the migration worth testing: today's files hold pending pixels
    e = _expected()
    assert json.loads((FIXTURE / "proposals.json").read_text())["format"] == 1
    for c in ("EX", "MA"):
        on_disk = read_mask(FIXTURE / f"eye_{c}.tif")
        np.testing.assert_array_equal(on_disk, e[f"shown_{c}"])
        assert (on_disk & ~e[f"hand_{c}"]).any()


def test_an_older_folder_reopens_the_same_and_is_rewritten_once_with_confirmed_masks(old_project):
    e = _expected()
    ann = ProjectFolder(old_project).load()
    _check_reads_like_today(ann, e)
    assert ann.notes == [] and not ann.legacy_sources
    # rewritten in the current form: format number, mask files of confirmed pixels only
    assert json.loads((old_project / "proposals.json").read_text())["format"] == 2
    for c in LESION_CODES:
        np.testing.assert_array_equal(read_mask(old_project / f"eye_{c}.tif"), e[f"hand_{c}"], err_msg=c)
    rows = {r["lesion"]: r for r in csv.DictReader((old_project / "lesions.csv").open())}
    assert int(rows["EX"]["area_px"]) == int(e["hand_EX"].sum()) == 33  # was 61 with the pending pixels
    assert int(rows["MA"]["area_px"]) == 3 and int(rows["MA"]["count"]) == 2
    assert float(rows["EX"]["area_pct_fov"]) == pytest.approx(100 * 33 / 400)  # provenance's field of view
    # opened again: the same, and nothing is written a second time
    after = _files(old_project)
    again = ProjectFolder(old_project).load()
    _check_reads_like_today(again, e)
    assert _files(old_project) == after


def test_overlay_follows_the_confirmed_pixels_after_the_rewrite(old_project):
    import cv2

    from napari_retina.fundus import overlay_rgb
    from napari_retina.io.images import read_fundus

    before = (old_project / "overlay.png").read_bytes()
    ann = ProjectFolder(old_project).load()
    rgb = read_fundus(old_project / "eye.png")
    got = cv2.cvtColor(cv2.imread(str(old_project / "overlay.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(got, overlay_rgb(rgb, ann.confirmed_masks()))
    assert (old_project / "overlay.png").read_bytes() != before


def _read_everything(folder: Path, tmp_path: Path, tag: str):
    """Labels as training (graders_masks), `evaluate refine` and a training bundle read them."""
    from napari_retina.bundle import write_bundle
    from napari_retina.evaluation import _labels
    from napari_retina.session import graders_masks

    from napari_retina.io.images import image_shape

    rec = open_dataset(folder).records[0]
    assert rec.project is not None
    codes = ["EX", "HE", "MA", "SE"]
    shape = image_shape(rec.image)
    training = graders_masks(rec, codes, shape)
    evaluate = _labels(rec, codes, shape)
    out = tmp_path / f"bundle-{tag}"
    write_bundle([folder], out, codes, ["exudates"])
    labels = json.loads((out / "data" / "labels.json").read_text())["labels"]
    bundle = {c: read_mask(out / "data" / f"{rec.stem}_{c}.tif") for c in labels[rec.stem]}
    return training, evaluate, bundle


def test_training_evaluate_and_the_bundle_read_the_same_labels_before_and_after(old_project, tmp_path, monkeypatch):
    e = _expected()
    folder = old_project.parent
    with monkeypatch.context() as m:  # read as the older form, not rewritten
        m.setattr(ProjectFolder, "_migrate", lambda self, ann: None)
        before = _read_everything(folder, tmp_path, "before")
        assert json.loads((old_project / "proposals.json").read_text())["format"] == 1
    ProjectFolder(old_project).load()  # the rewrite
    assert json.loads((old_project / "proposals.json").read_text())["format"] == 2
    after = _read_everything(folder, tmp_path, "after")
    training, evaluate, bundle = before
    # reviewed lesions: the grader's confirmed pixels; SE is not reviewed: no label
    assert training["SE"] is None and set(bundle) == {"EX", "HE", "MA"}
    for c in ("EX", "HE", "MA"):
        np.testing.assert_array_equal(training[c], e[f"hand_{c}"])
        np.testing.assert_array_equal(bundle[c], e[f"hand_{c}"])
        np.testing.assert_array_equal(evaluate[c], e[f"hand_{c}"])
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for c in b:
            if b[c] is None:
                assert a[c] is None
            else:
                np.testing.assert_array_equal(a[c], b[c], err_msg=c)


def test_a_folder_that_cannot_be_written_opens_as_before_with_one_note_and_its_next_save_rewrites_it(
    old_project, monkeypatch
):
    e = _expected()
    before = _files(old_project)

    def refuse(path, *a, **k):
        raise RetinaInputError(f"cannot write {path}: Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(project_module, "atomic_write", refuse)
        m.setattr(project_module, "atomic_write_text", refuse)
        m.setattr(project_module, "write_mask", refuse)
        ann = ProjectFolder(old_project).load()
    _check_reads_like_today(ann, e)
    assert len(ann.notes) == 1 and "Read-only" in ann.notes[0] and ann.legacy_sources
    assert _files(old_project) == before  # nothing half-written
    # the folder became writable: the next save (one edit) rewrites it whole, nothing lost
    stroke = np.zeros((H, W), bool)
    stroke[0, 0] = True
    ann.record.hand_edit("SE", (0, H, 0, W), painted=stroke)
    writer = ProjectWriter(old_project, old_project / "eye.png", fundus_rgb(0, H, W), ann)
    writer.write(ann.snapshot(), summary=True)
    assert json.loads((old_project / "proposals.json").read_text())["format"] == 2
    for c in ("EX", "MA"):
        np.testing.assert_array_equal(read_mask(old_project / f"eye_{c}.tif"), e[f"hand_{c}"])
    back = ProjectFolder(old_project).load()
    e["shown_SE"] = e["hand_SE"] = stroke
    _check_reads_like_today(back, e)


@pytest.mark.parametrize("killed_at", ["table", "masks"])
def test_a_rewrite_killed_half_way_loses_nothing(old_project, monkeypatch, killed_at):
    """Killed before the table is written (old table, new proposal files): the next opening reads
    the same and rewrites it. Killed after it (new table, mask files still holding shown pixels):
    the next opening reads the same, and the next save rewrites the mask files."""
    e = _expected()
    target = "atomic_write_text" if killed_at == "table" else "write_mask"

    def killed(*a, **k):
        raise KeyboardInterrupt  # not an error the migration handles: the process dies here

    with monkeypatch.context() as m:
        m.setattr(project_module, target, killed)
        with pytest.raises(KeyboardInterrupt):
            ProjectFolder(old_project).load()
    form = json.loads((old_project / "proposals.json").read_text())["format"]
    assert form == (1 if killed_at == "table" else 2)
    assert read_mask(old_project / "eye_EX.tif").sum() == 61  # still the shown pixels
    ann = ProjectFolder(old_project).load()
    _check_reads_like_today(ann, e)
    if killed_at == "masks":
        assert ann.legacy_sources and read_mask(old_project / "eye_EX.tif").sum() == 61  # opening wrote nothing
        ann.record.hand_edit("SE", (0, H, 0, W), painted=np.zeros((H, W), bool) | (np.arange(W) == 0))
        ProjectWriter(old_project, old_project / "eye.png", fundus_rgb(0, H, W), ann).write(ann.snapshot())
        e["shown_SE"] = e["hand_SE"] = ann.confirmed("SE")
        _check_reads_like_today(ProjectFolder(old_project).load(), e)
    for c in LESION_CODES:
        np.testing.assert_array_equal(read_mask(old_project / f"eye_{c}.tif"), e[f"hand_{c}"], err_msg=c)
    assert json.loads((old_project / "proposals.json").read_text())["format"] == 2


def _sources_form_project(tmp_path):
    """The form before proposal tables, as its writer made it: sources.json names each
    contributor, sources/<LESION>.png holds one contributor id per pixel (1 = the grader)."""
    import cv2

    from PIL import Image

    folder = tmp_path / "projects" / "old.retina"
    folder.mkdir(parents=True)
    Image.fromarray(fundus_rgb(4)).save(folder / "old.png")
    hand = blob_mask([(30, 30)], radius=4)
    model = blob_mask([(30, 40)], radius=4)
    from conftest import write_palette_mask

    write_palette_mask(folder / "old_EX.tif", hand | model)  # the shown pixels
    src = np.zeros(hand.shape, np.uint16)
    src[hand] = 1
    src[model & ~hand] = 7
    (folder / "sources").mkdir()
    cv2.imwrite(str(folder / "sources" / "EX.png"), src)
    table = {"lesions": ["EX"], "sources": {"1": {"kind": "hand"},
                                            "7": {"kind": "model", "model": "refiner", "ellipse_id": "old1", "lesion": "EX"}}}
    (folder / "sources.json").write_text(json.dumps(table))
    (folder / "provenance.json").write_text(json.dumps({"image": "old.png", "reviewed": {"EX": {"by": "kim"}}}))
    return folder, hand, model


def test_the_sources_form_reopens_the_same_and_is_rewritten_once(tmp_path, monkeypatch):
    folder, hand, model = _sources_form_project(tmp_path)
    shape = hand.shape
    with monkeypatch.context() as m:
        m.setattr(ProjectFolder, "_migrate", lambda self, ann: None)
        before = _read_everything(folder.parent, tmp_path, "before")
        assert (folder / "sources.json").exists()
    ann = ProjectFolder(folder).load()
    np.testing.assert_array_equal(ann.masks["EX"], hand | model)
    np.testing.assert_array_equal(ann.confirmed("EX"), hand)
    np.testing.assert_array_equal(ann.pending("EX"), model & ~hand)
    [p] = ann.record.find(ellipse_id="old1")
    assert p.description["model"] == "refiner"
    # rewritten: the proposal record of the current form, the mask file of confirmed pixels
    assert not (folder / "sources.json").exists() and not (folder / "sources").exists()
    assert json.loads((folder / "proposals.json").read_text())["format"] == 2
    np.testing.assert_array_equal(read_mask(folder / "old_EX.tif"), hand)
    after = _read_everything(folder.parent, tmp_path, "after")
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b["EX"], hand)
        np.testing.assert_array_equal(a["EX"], b["EX"])
    back = ProjectFolder(folder).load()
    np.testing.assert_array_equal(back.masks["EX"], hand | model)
    back.record.withdraw_where(ellipse_id="old1")
    np.testing.assert_array_equal(back.masks["EX"], hand)
    assert shape == back.shape


def test_layers_of_confirmed_or_shown_pixels_restore_the_same_record(old_project):
    """The dock adopts the reader's layers: their confirmed pixels (or all they show) plus the record."""
    from napari_retina.io.project import Annotation

    e = _expected()
    ProjectFolder(old_project).load()  # rewritten
    for kind in ("hand", "shown"):
        ann = Annotation.empty("eye.png", (H, W))
        for c in LESION_CODES:
            ann.masks[c] = e[f"{kind}_{c}"].copy()
        ProjectFolder(old_project).load_bookkeeping(ann)
        _check_reads_like_today(ann, e)


def test_layers_of_confirmed_pixels_read_an_older_folder_that_could_not_be_rewritten(old_project):
    from napari_retina.io.project import Annotation

    e = _expected()
    ann = Annotation.empty("eye.png", (H, W))
    for c in LESION_CODES:
        ann.masks[c] = e[f"hand_{c}"].copy()
    ProjectFolder(old_project).load_bookkeeping(ann, migrate=False)
    _check_reads_like_today(ann, e)
    assert ann.legacy_sources
