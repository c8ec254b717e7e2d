"""A grader's corrections reach training: a reviewed lesion of a project beside the image wins over
the data set's masks; an unreviewed one falls back to them; a lesion with neither is left out."""

import numpy as np
import pytest

from conftest import EX_BLOBS, blob_mask


def _correct_in_project(record, code="EX", reviewed=True):
    """What the annotator saves after a grader erases one blob, paints one and leaves one proposal."""
    from napari_retina.io.project import ProjectWriter
    from napari_retina.session import open_record

    op = open_record(record)
    ann = op.annotation
    rec = ann.record
    gt = ann.masks[code].copy()
    first = blob_mask(EX_BLOBS[:1])
    rec.hand_edit(code, (0, gt.shape[0], 0, gt.shape[1]), erased=first)  # the first blob was wrong
    painted = blob_mask([(80, 110)], radius=2)
    rec.hand_edit(code, (0, gt.shape[0], 0, gt.shape[1]), painted=painted)  # one the data set missed
    prob = np.zeros(gt.shape, np.float32)
    prob[5:15, 100:120] = 0.9  # a model proposal never accepted
    rec.propose(code, (0, gt.shape[0], 0, gt.shape[1]), prob=prob, threshold=0.5,
                description={"kind": "model", "model": "exudates"})
    if reviewed:
        ann.set_reviewed(code, grader="test")
    writer = ProjectWriter(op.project_dir, op.record.image, op.rgb, ann.masks)
    writer.write(ann.snapshot(ellipses=ann.ellipses, all_lesions=True))
    assert op.project_dir.is_dir()
    return (gt & ~first) | painted, prob >= 0.5


@pytest.mark.parametrize("layout", ["flat", "idrid"])
def test_a_corrected_project_beside_the_image_is_what_training_reads(layout, flat_folder, idrid_folder):
    from napari_retina.io.datasets import open_dataset
    from training.data import load_image, load_scaled

    root = flat_folder if layout == "flat" else idrid_folder
    record = [r for r in open_dataset(root).records if r.stem == "IDRiD_01"][0]
    want, proposal = _correct_in_project(record)
    record = [r for r in open_dataset(root).records if r.stem == "IDRiD_01"][0]  # as training lists it
    img = load_image(record, lesions=("EX",))
    np.testing.assert_array_equal(img.masks["EX"], want)
    assert not (img.masks["EX"] & proposal).any()  # the unaccepted proposal is not a label
    scaled = load_scaled(record, "EX", 1.0)
    np.testing.assert_array_equal(scaled.target >= 0.5, want)
    # the image without a project still reads the data set's own masks
    other = [r for r in open_dataset(root).records if r.stem == "IDRiD_02"][0]
    assert "EX" not in load_image(other, lesions=("EX",)).masks


@pytest.mark.parametrize("layout", ["flat", "idrid"])
def test_an_unreviewed_lesion_falls_back_to_ground_truth_and_one_without_either_is_left_out(layout, flat_folder,
                                                                                           idrid_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.masks import read_mask
    from napari_retina.session import label_source
    from training.data import describe_labels, load_image, load_scaled

    root = flat_folder if layout == "flat" else idrid_folder
    record = [r for r in open_dataset(root).records if r.stem == "IDRiD_01"][0]
    want, proposal = _correct_in_project(record, reviewed=False)
    record = [r for r in open_dataset(root).records if r.stem == "IDRiD_01"][0]
    assert label_source(record, "EX") == "ground truth"
    gt = read_mask(record.masks["EX"])
    np.testing.assert_array_equal(load_image(record, lesions=("EX",)).masks["EX"], gt)
    assert not np.array_equal(gt, want)  # the unreviewed corrections are not labels yet
    # a lesion the data set does not annotate, and that no project reviewed: no label, not a negative
    missing = "SE"
    assert missing not in record.truth and label_source(record, missing) == "left out"
    assert load_scaled(record, missing, 1.0) is None
    assert missing not in load_image(record, lesions=(missing,)).masks
    # an image without a mask file for a lesion its data set annotates: ground truth "no lesion"
    other = [r for r in open_dataset(root).records if r.stem == "IDRiD_02"][0]
    assert "EX" not in other.masks and label_source(other, "EX") == "ground truth"
    assert not load_scaled(other, "EX", 1.0).target.any()
    line = describe_labels(open_dataset(root).records, ["EX", missing])
    assert "0 image-lesion pairs from reviewed projects" in line and "left out" in line


def test_a_training_bundle_carries_exactly_the_labels_and_the_command(flat_folder, tmp_path):
    from napari_retina.bundle import write_bundle
    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.masks import read_mask
    from napari_retina.session import label_source
    from training.data import load_image

    record = [r for r in open_dataset(flat_folder).records if r.stem == "IDRiD_01"][0]
    want, proposal = _correct_in_project(record, reviewed=True)  # EX reviewed in the project
    out = tmp_path / "bundle"
    summary = write_bundle([flat_folder], out, ["EX", "SE"], ["exudates", "--epochs", "40"])
    assert summary["images"] == 2 and summary["labels"] == 2 and summary["left_out"] == 2  # SE: no label anywhere
    np.testing.assert_array_equal(read_mask(out / "data" / "IDRiD_01_EX.tif"), want)  # the corrections
    assert (out / "data" / "IDRiD_02_EX.tif").is_file()  # an empty label is written, not implied
    assert not list((out / "data").glob("*_SE.tif"))
    script = (out / "train.sh").read_text()
    assert "python -m training exudates --epochs 40 --data data --out runs/model" in script and "torchrun" in script
    # on the server: the same labels, nothing more
    ds = open_dataset(out / "data")
    rec1 = [r for r in ds.records if r.stem == "IDRiD_01"][0]
    assert label_source(rec1, "EX") == "ground truth" and label_source(rec1, "SE") == "left out"
    np.testing.assert_array_equal(load_image(rec1, lesions=("EX",)).masks["EX"], want)
    with pytest.raises(Exception, match="not empty"):
        write_bundle([flat_folder], out, ["EX"], ["exudates"])
