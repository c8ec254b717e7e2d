"""The refinement model shipped in the package: loads offline, is what its card says, refines."""

import json

import numpy as np
import pytest

from conftest import fundus_rgb
from napari_retina.io.ellipses import Ellipse, rasterize_ellipse
from napari_retina.models.folder import MAX_WEIGHTS_BYTES, sha256_of
from napari_retina.models.refiner import EllipseRefiner, default_model_dir


def test_shipped_model_folder_is_complete_and_its_checksum_matches():
    d = default_model_dir()
    weights = d / "weights.safetensors"
    config = json.loads((d / "config.json").read_text())
    card = (d / "card.md").read_text()
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    assert config["weights_sha256"] == sha256_of(weights) and config["weights_sha256"] in card
    # the card names the held-out images, and the split is by image
    val = config["validation_images"]
    assert len(val) >= 5 and all(name in card for name in val)
    assert 0 < config["threshold"] < 1


def test_shipped_model_refines_inside_the_ellipse_only():
    refiner = EllipseRefiner()  # the default: the shipped folder, no network access involved
    rgb = fundus_rgb(3)
    rgb[40:50, 60:72] = (250, 240, 120)  # a bright exudate-like spot
    e = Ellipse("EX", (66.0, 45.0), (14.0, 11.0), 0.0)
    prob = refiner.refine_probability(rgb, [e], superpixels=False)
    inside = rasterize_ellipse(e, rgb.shape[:2])
    assert np.all(prob[~inside] == 0)
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    spot = np.zeros_like(inside)
    spot[40:50, 60:72] = True
    # a trained model favours the bright lesion over the rest of the ellipse
    assert prob[spot & inside].mean() > prob[inside & ~spot].mean() + 0.2


def test_traced_inference_equals_the_network_for_any_batch_and_thin_ellipses():
    import torch

    refiner = EllipseRefiner()
    refiner.batch_size = 2  # three ellipses: one full batch and one single
    rgb = fundus_rgb(5)
    # a thin ellipse too: its 1/4-scale coarse mask needs the "any coverage" fallback of the pooling
    ellipses = [
        Ellipse("EX", (60.0, 50.0), (14.0, 9.0), 20.0),
        Ellipse("MA", (90.0, 70.0), (3.0, 2.0), 0.0),
        Ellipse("HE", (40.0, 80.0), (40.0, 0.6), 45.0),
    ]
    for batch in (ellipses[:1], ellipses):
        _, traced = refiner.patch_probabilities(rgb, batch, superpixels=False)
        _, imgs, masks = refiner._batch(rgb, batch)
        with torch.inference_mode():
            eager = refiner.net.predict_proba(torch.from_numpy(imgs), torch.from_numpy(masks), superpixels=False)
        np.testing.assert_allclose(traced, eager[:, 0].numpy(), atol=5e-5)  # batch norms folded into the convolutions round differently
    assert sorted(refiner._traces) == [("forward", 1), ("forward", 2)]  # only ever these two


def test_the_shipped_microaneurysm_detector_is_complete_and_loads_its_three_networks():
    from napari_retina.models.microaneurysms import MicroaneurysmDetector
    from napari_retina.models.registry import load_model, shipped_model_dir

    d = shipped_model_dir("microaneurysms")
    config = json.loads((d / "config.json").read_text())
    weights = d / "weights.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES and config["weights_sha256"] == sha256_of(weights)
    assert all(name in (d / "card.md").read_text() for name in config["validation_images"])
    det = load_model(d)
    # the refinement network and the rule it applies are the ones the config names (not a choice pinned here)
    assert isinstance(det, MicroaneurysmDetector) and det.prn is not None and config["prn"]["net"]["widths"]
    assert det.prn_rule == config["prn_rule"]
    assert config["hgn_full"]["input_scale"] == 1.0 and config["hgn_half"]["input_scale"] == 0.5
    # recalibrated on validation: the fused map's best F1 at 0.5, the final threshold in a usable range
    assert det.logit_offset == config["fused_logit_offset"] != 0 and 0.05 < det.threshold < 0.95


# each shipped model's headline validation figure: where its config.json records it, and how its card rounds it
HEADLINE_FIGURES = {
    "refiner": (("training", "val_image_iou"), "{:.2f}"),
    "exudates": (("training", "val_aupr_working_scale"), "{:.3f}"),
    "microaneurysms": (("validation_scores", "aupr"), "{:.3f}"),
}


@pytest.mark.parametrize("kind", sorted(HEADLINE_FIGURES))
def test_the_card_states_the_validation_figure_its_config_records(kind):
    """A contract, whatever model ships: the figure in config.json is the one card.md states."""
    from napari_retina.models.registry import shipped_model_dir

    d = shipped_model_dir(kind)
    config = json.loads((d / "config.json").read_text())
    path, fmt = HEADLINE_FIGURES[kind]
    value = config
    for key in path:
        value = value[key]
    assert isinstance(value, (int, float)) and value > 0
    assert fmt.format(value) in (d / "card.md").read_text(), (kind, value)
