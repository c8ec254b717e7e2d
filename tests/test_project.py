import csv
import json
import time

import numpy as np
import pytest
from PIL import Image

from conftest import EX_BLOBS, HE_BLOBS, blob_mask, fundus_rgb, write_palette_mask
from napari_retina.io.atomic import atomic_path, is_atomic_temporary
from napari_retina.io.ellipses import Ellipse, EllipseFile, ellipse_bbox
from napari_retina.io.errors import RetinaInputError
from napari_retina.io.images import sha256_file
from napari_retina.io.masks import read_mask
from napari_retina.io.project import Annotation, ProjectFolder, ProjectWriter, default_project_dir


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "eye.jpg"
    Image.fromarray(fundus_rgb(3)).save(p, quality=92)
    return p


def _temporaries(folder):
    """Temporary files of atomic writes left in a project folder (hidden `.<name>.<random>.tmp<suffix>`)."""
    return [p for p in folder.rglob("*") if is_atomic_temporary(p.name)]


def test_temporaries_are_recognised(tmp_path):
    with atomic_path(tmp_path / "overlay.png") as tmp:
        assert _temporaries(tmp_path) == [tmp]  # the leftover check can see a real one
    assert _temporaries(tmp_path) == []


def _annotation(shape):
    ann = Annotation.empty("eye.jpg", shape)
    ann.masks["EX"] = blob_mask(EX_BLOBS)
    ann.masks["HE"] = blob_mask(HE_BLOBS, radius=5)
    ann.ellipses = EllipseFile(
        image="eye.jpg",
        ellipses=[Ellipse("EX", (40.0, 30.0), (6.0, 3.0), 30.0, {"id": "a1", "author": "kim", "note": "keep"})],
        extra={"reviewed": False},
    )
    return ann


def test_default_project_dir(tmp_path):
    assert default_project_dir(tmp_path / "a" / "IDRiD_55.jpg") == tmp_path / "a" / "IDRiD_55.retina"
    assert default_project_dir(tmp_path / "a" / "x.png", root=tmp_path / "p") == tmp_path / "p" / "x.retina"


def test_save_and_load_round_trip(tmp_path, image):
    proj = ProjectFolder.create(default_project_dir(image), image, grader="kim")
    rgb = fundus_rgb(3)
    ann = _annotation(rgb.shape[:2])
    proj.save(ann, rgb=rgb, fov_area_px=4000, grader="kim")

    files = {p.name for p in proj.path.iterdir()}
    assert {"eye.jpg", "ellipses.json", "provenance.json", "overlay.png", "lesions.csv"} <= files
    assert {f"eye_{c}.tif" for c in ("EX", "HE", "MA", "SE", "OD")} <= files
    assert _temporaries(proj.path) == []
    # the image is copied byte for byte
    assert (proj.path / "eye.jpg").read_bytes() == image.read_bytes()
    # masks are 1-bit palette TIFFs (IDRiD convention)
    with Image.open(proj.path / "eye_EX.tif") as im:
        assert im.mode == "P" and im.tag_v2[258] in (1, (1,))

    back = ProjectFolder(proj.path).load()
    assert back.shape == rgb.shape[:2]
    for code in ("EX", "HE", "MA"):
        np.testing.assert_array_equal(back.masks[code], ann.masks[code])
    e = back.ellipses.ellipses[0]
    assert e.lesion == "EX" and e.center_xy == (40.0, 30.0) and e.extra["note"] == "keep"
    assert back.ellipses.extra == {"reviewed": False}

    prov = json.loads((proj.path / "provenance.json").read_text())
    assert prov["grader"] == "kim"
    assert prov["image_sha256"] == sha256_file(image)
    assert prov["tool"] == "napari-retina" and prov["tool_version"]
    assert prov["created"] <= prov["modified"]

    rows = list(csv.DictReader((proj.path / "lesions.csv").open()))
    by = {r["lesion"]: r for r in rows}
    assert [r["lesion"] for r in rows] == ["EX", "HE", "MA", "SE", "OD"]
    assert int(by["EX"]["count"]) == 2 and int(by["HE"]["count"]) == 1 and int(by["MA"]["count"]) == 0
    ex_area = int(ann.masks["EX"].sum())
    assert int(by["EX"]["area_px"]) == ex_area
    assert float(by["EX"]["area_pct_fov"]) == pytest.approx(100 * ex_area / 4000, abs=1e-4)


def _ellipse_proposal(ann, lesion, centre, axes, eid, threshold=0.5):
    """A refiner-like proposal: probabilities falling from the centre, zero outside the ellipse."""
    e = Ellipse(lesion, centre, axes, 0.0)
    r0, r1, c0, c1 = ellipse_bbox(e, shape=ann.shape)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    d = np.hypot((rr - centre[1]) / axes[1], (cc - centre[0]) / axes[0])
    prob = np.clip(1.0 - d, 0, 1).astype(np.float32)
    desc = {"kind": "model", "model": "refiner", "version": "t1", "ellipse_id": eid}
    p, _ = ann.record.propose(lesion, (r0, r1, c0, c1), prob=prob, threshold=threshold, description=desc)
    return p


def test_proposals_survive_reopening_with_hand_pixels_overlaps_and_erasures(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "p.retina", image)
    ann = Annotation.empty("eye.jpg", (96, 128))
    hand = blob_mask([(30, 30)], radius=4)
    ann.masks["EX"] |= hand
    a = _ellipse_proposal(ann, "EX", (36.0, 30.0), (10.0, 6.0), "a")
    b = _ellipse_proposal(ann, "EX", (44.0, 30.0), (10.0, 6.0), "b", threshold=0.3)
    he = _ellipse_proposal(ann, "HE", (40.0, 30.0), (10.0, 6.0), "h")
    erased = np.zeros((96, 128), bool)
    erased[30, 46] = True  # claimed by b only
    assert ann.masks["EX"][30, 46]
    ann.record.hand_edit("EX", (0, 96, 0, 128), erased=erased)
    masks_before = {c: m.copy() for c, m in ann.masks.items()}
    proj.save(ann)

    back = ProjectFolder(proj.path).load()
    for code in ("EX", "HE"):
        np.testing.assert_array_equal(back.masks[code], masks_before[code])
    assert {p.description["ellipse_id"] for p in back.record.proposals.values()} == {"a", "b", "h"}
    assert back.record.find(ellipse_id="b")[0].threshold == 0.3
    assert back.record.find(ellipse_id="a")[0].description["version"] == "t1"
    # deleting ellipse a takes only what nobody else claims: hand and b's pixels stay
    back.record.withdraw_where(ellipse_id="a")
    want = hand | np.pad(b.claim(), ((b.box[0], 96 - b.box[1]), (b.box[2], 128 - b.box[3])))
    np.testing.assert_array_equal(back.masks["EX"], want)
    # the erasure is remembered: a lower threshold does not bring the pixel back
    back.record.set_threshold(0.05, ellipse_id="b")
    assert not back.masks["EX"][30, 46]
    back.record.withdraw_where(ellipse_id="b")
    np.testing.assert_array_equal(back.masks["EX"], hand)
    np.testing.assert_array_equal(back.masks["HE"], masks_before["HE"])  # another lesion: untouched
    assert he.id in back.record.proposals


def test_hand_pixels_under_a_proposal_survive_reopening(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "p.retina", image)
    ann = Annotation.empty("eye.jpg", (96, 128))
    p = _ellipse_proposal(ann, "MA", (40.0, 40.0), (8.0, 8.0), "m")
    stroke = np.zeros((96, 128), bool)
    stroke[40, 30:50] = True  # painted over model pixels too: those become the grader's
    ann.record.hand_edit("MA", (0, 96, 0, 128), painted=stroke)
    proj.save(ann)
    back = ProjectFolder(proj.path).load()
    back.record.withdraw_where(ellipse_id="m")
    np.testing.assert_array_equal(back.masks["MA"], stroke)


def test_projects_of_the_earlier_source_map_format_still_open(tmp_path, image):
    """sources.json + sources/<LESION>.png (one contributor per pixel) open and are rewritten."""
    import cv2

    proj = ProjectFolder.create(tmp_path / "old.retina", image)
    hand = blob_mask([(30, 30)], radius=4)
    model = blob_mask([(30, 40)], radius=4)
    mask = hand | model
    write_palette_mask(proj.mask_path("EX"), mask)
    src = np.zeros((96, 128), np.uint16)
    src[hand] = 1
    src[model & ~hand] = 7
    (proj.path / "sources").mkdir()
    cv2.imwrite(str(proj.path / "sources" / "EX.png"), src)
    table = {"lesions": ["EX"], "sources": {"1": {"kind": "hand"}, "7": {"kind": "model", "model": "refiner", "ellipse_id": "old1", "lesion": "EX"}}}
    (proj.path / "sources.json").write_text(json.dumps(table))

    ann = proj.load()
    [p] = ann.record.find(ellipse_id="old1")
    assert p.lesion == "EX" and p.description["model"] == "refiner"
    proj.save(ann)
    assert not (proj.path / "sources.json").exists() and not (proj.path / "sources").exists()
    back = proj.load()
    back.record.withdraw_where(ellipse_id="old1")
    np.testing.assert_array_equal(back.masks["EX"], hand)


def test_brush_over_model_pixels_makes_them_hand_pixels():
    ann = Annotation.empty("x.jpg", (20, 20))
    model = np.zeros((20, 20), bool)
    model[5:10, 5:10] = True
    p, _ = ann.record.propose("MA", (5, 10, 5, 10), mask=model[5:10, 5:10], description={"kind": "model"})
    stroke = np.zeros_like(model)
    stroke[5:7, 5:10] = True
    ann.record.hand_edit("MA", (0, 20, 0, 20), painted=stroke)
    ann.record.withdraw(p.id)
    np.testing.assert_array_equal(ann.masks["MA"], stroke)


def test_unwritable_project_folder_is_one_clear_error(tmp_path, image):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RetinaInputError, match="cannot"):
        ProjectFolder.create(blocker / "eye.retina", image)


def test_mask_of_the_wrong_size_is_left_out_and_kept_until_edited(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    write_palette_mask(proj.mask_path("HE"), blob_mask(HE_BLOBS, radius=5))
    bad = proj.mask_path("EX")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    bad_bytes = bad.read_bytes()
    ann = proj.load()
    assert set(ann.unreadable) == {"EX"} and not ann.masks["EX"].any()
    assert len(ann.notes) == 1 and "eye_EX.tif" in ann.notes[0] and "10x10" in ann.notes[0]
    np.testing.assert_array_equal(ann.masks["HE"], blob_mask(HE_BLOBS, radius=5))  # the rest opens
    # saving everything else (even "all lesions") leaves the unreadable file as it is
    stroke = blob_mask([(20, 20)], radius=2)
    ann.record.hand_edit("HE", (0, 96, 0, 128), painted=stroke)
    proj.save(ann)
    assert bad.read_bytes() == bad_bytes
    assert read_mask(proj.mask_path("HE"))[20, 20]
    # once the grader edits EX, EX is written; the unreadable bytes are kept beside it
    ann.record.hand_edit("EX", (0, 96, 0, 128), painted=stroke)
    writer = ProjectWriter(proj.path, image, fundus_rgb(3), ann.masks)
    writer.write(ann.snapshot())
    np.testing.assert_array_equal(read_mask(bad), stroke)
    assert (proj.path / "eye_EX.tif.unreadable").read_bytes() == bad_bytes


def test_opening_removes_temporary_files_a_killed_save_left(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ProjectFolder(proj.path).save(_annotation((96, 128)))
    leftovers = [proj.path / ".overlay.k2j9_x0a.tmp.png", proj.path / ".eye_EX.abcdefgh.tmp.tif", proj.path / ".lesions.q1w2e3r4.tmp.csv"]
    for p in leftovers:
        p.write_bytes(b"half")
    keep = [proj.path / "notes.tmp.txt", proj.path / ".hidden"]
    for p in keep:
        p.write_text("mine")
    assert sorted(_temporaries(proj.path)) == sorted(leftovers)  # the check sees them
    proj.load()
    assert _temporaries(proj.path) == []
    assert all(p.exists() for p in keep)


def test_writer_writes_only_what_changed(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ann = _annotation((96, 128))
    proj.save(ann, rgb=fundus_rgb(3))
    ann = proj.load()
    writer = ProjectWriter(proj.path, image, fundus_rgb(3), ann.masks)
    names = ["eye_EX.tif", "eye_HE.tif", "eye_MA.tif", "eye_SE.tif", "eye_OD.tif", "ellipses.json", "overlay.png", "lesions.csv"]
    before = {n: (proj.path / n).stat().st_mtime_ns for n in names}
    time.sleep(0.01)
    stroke = np.zeros((96, 128), bool)
    stroke[10, 10:14] = True
    ann.record.hand_edit("MA", (0, 96, 0, 128), painted=stroke)
    snap = ann.snapshot()
    assert set(snap.masks) == {"MA"}  # only the edited mask is copied
    rows = writer.write(snap)
    after = {n: (proj.path / n).stat().st_mtime_ns for n in names}
    assert [n for n in names if after[n] != before[n]] == ["eye_MA.tif"]
    assert {r["lesion"]: r["count"] for r in rows}["MA"] == 1
    assert read_mask(proj.path / "eye_MA.tif").sum() == 4
    # a proposal: its file and the table, still no other mask
    p = _ellipse_proposal(ann, "SE", (60.0, 50.0), (8.0, 6.0), "s")
    writer.write(ann.snapshot())
    assert proj.proposal_path(p.id).exists() and json.loads((proj.path / "proposals.json").read_text())["proposals"][0]["id"] == p.id
    assert [n for n in names if (proj.path / n).stat().st_mtime_ns != after[n]] == ["eye_SE.tif"]
    # removing it deletes its file; the summary files change only when asked for
    ann.record.withdraw(p.id)
    writer.write(ann.snapshot(), summary=True)
    assert not proj.proposal_path(p.id).exists()
    assert (proj.path / "overlay.png").stat().st_mtime_ns != before["overlay.png"]


def test_saving_only_changed_lesions_keeps_the_others(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ann = _annotation((96, 128))
    proj.save(ann)
    before = (proj.path / "eye_HE.tif").stat().st_mtime_ns
    ann.masks["EX"][:] = False
    proj.save(ann, lesions={"EX"})
    assert (proj.path / "eye_HE.tif").stat().st_mtime_ns == before
    assert not read_mask(proj.path / "eye_EX.tif").any()


def _overlay_on_disk(proj):
    import cv2

    return cv2.cvtColor(cv2.imread(str(proj.path / "overlay.png")), cv2.COLOR_BGR2RGB)


def test_pending_proposals_stay_off_the_mask_files_the_overlay_and_the_table_until_accepted(tmp_path, image):
    from napari_retina.fundus import overlay_rgb

    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    rgb = fundus_rgb(3)
    ann = Annotation.empty("eye.jpg", (96, 128))
    hand = blob_mask([(30, 30)], radius=4)
    ann.record.hand_edit("EX", (0, 96, 0, 128), painted=hand)
    a = _ellipse_proposal(ann, "EX", (60.0, 60.0), (10.0, 6.0), "a", threshold=0.3)
    ma = _ellipse_proposal(ann, "MA", (90.0, 70.0), (4.0, 4.0), "m")
    pending = ann.masks["EX"] & ~hand
    assert pending.sum() > 20 and ann.masks["MA"].any()  # shown in memory
    np.testing.assert_array_equal(ann.pending("EX"), pending)
    proj.save(ann, rgb=rgb, fov_area_px=4000)
    # the files hold the grader's pixels only
    np.testing.assert_array_equal(read_mask(proj.mask_path("EX")), hand)
    assert not read_mask(proj.mask_path("MA")).any()
    rows = {r["lesion"]: r for r in csv.DictReader((proj.path / "lesions.csv").open())}
    assert (int(rows["EX"]["count"]), int(rows["EX"]["area_px"])) == (1, int(hand.sum()))
    assert (int(rows["MA"]["count"]), int(rows["MA"]["area_px"])) == (0, 0)
    confirmed = {c: np.zeros((96, 128), bool) for c in ("EX", "HE", "MA", "SE", "OD")}
    confirmed["EX"] = hand
    np.testing.assert_array_equal(_overlay_on_disk(proj), overlay_rgb(rgb, confirmed))
    assert json.loads((proj.path / "proposals.json").read_text())["format"] == 2
    # reopened: shown again, still pending, same threshold
    back = ProjectFolder(proj.path).load()
    np.testing.assert_array_equal(back.masks["EX"], hand | pending)
    np.testing.assert_array_equal(back.confirmed("EX"), hand)
    assert back.record.find(ellipse_id="a")[0].threshold == 0.3 and back.record.find(ellipse_id="m")
    # accepted (through the autosave path): now in the file, the table and the overlay
    writer = ProjectWriter(proj.path, image, rgb, back)
    assert back.record.accept(lesion="EX") == int(pending.sum())
    rows = writer.write(back.snapshot(), summary=True)
    np.testing.assert_array_equal(read_mask(proj.mask_path("EX")), hand | pending)
    assert not read_mask(proj.mask_path("MA")).any()  # MA's proposal is still pending
    assert {r["lesion"]: r["area_px"] for r in rows}["EX"] == int((hand | pending).sum())
    confirmed["EX"] = hand | pending
    np.testing.assert_array_equal(_overlay_on_disk(proj), overlay_rgb(rgb, confirmed))
    again = ProjectFolder(proj.path).load()
    assert not again.record.find(ellipse_id="a") and again.record.find(ellipse_id="m")
    np.testing.assert_array_equal(again.confirmed("EX"), hand | pending)
    np.testing.assert_array_equal(again.masks["MA"], ann.masks["MA"])
    assert a.id not in again.record.proposals and ma.id in again.record.proposals


def test_painting_over_a_pending_pixel_confirms_it_in_the_file(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ann = Annotation.empty("eye.jpg", (96, 128))
    writer = ProjectWriter(proj.path, image, fundus_rgb(3), ann)
    _ellipse_proposal(ann, "SE", (60.0, 50.0), (8.0, 6.0), "s")
    writer.write(ann.snapshot(all_lesions=True))
    assert not read_mask(proj.mask_path("SE")).any()
    stroke = np.zeros((96, 128), bool)
    stroke[50, 56:65] = True
    assert ann.masks["SE"][stroke].all()  # every pixel of it shown (pending) already
    ann.record.hand_edit("SE", (0, 96, 0, 128), painted=stroke)
    snap = ann.snapshot()
    assert set(snap.masks) == {"SE"}  # nothing shown changed, yet the file must be rewritten
    writer.write(snap)
    np.testing.assert_array_equal(read_mask(proj.mask_path("SE")), stroke)
    back = ProjectFolder(proj.path).load()
    back.record.withdraw_where(ellipse_id="s")
    np.testing.assert_array_equal(back.masks["SE"], stroke)


def test_the_writer_counts_confirmed_pixels_of_lesions_it_did_not_rewrite(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ann = Annotation.empty("eye.jpg", (96, 128))
    _ellipse_proposal(ann, "EX", (60.0, 60.0), (10.0, 6.0), "a")
    proj.save(ann)
    back = ProjectFolder(proj.path).load()
    assert back.masks["EX"].any()
    writer = ProjectWriter(proj.path, image, fundus_rgb(3), back)  # EX is not written again below
    back.record.hand_edit("MA", (0, 96, 0, 128), painted=blob_mask([(20, 20)], radius=2))
    rows = {r["lesion"]: r for r in writer.write(back.snapshot(), summary=True)}
    assert rows["EX"]["area_px"] == 0 and rows["EX"]["count"] == 0 and rows["MA"]["count"] == 1
    table = {r["lesion"]: r for r in csv.DictReader((proj.path / "lesions.csv").open())}
    assert table["EX"]["area_px"] == "0"
