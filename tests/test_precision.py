"""The arithmetic of the segmenters' networks: bfloat16 where the processor computes it natively, else float32."""

import numpy as np
import pytest
import torch

from conftest import fundus_rgb
from napari_retina.models import precision
from napari_retina.models.registry import load_model
from test_segment import _segmenter_folder


def test_float32_when_asked_and_on_devices_without_native_bfloat16(monkeypatch):
    monkeypatch.setenv(precision.FLOAT32_ENV, "1")
    assert precision.inference_dtype("cpu") == "float32"
    with precision.inference_precision("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(precision.FLOAT32_ENV, "0")
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    assert precision.inference_dtype("cpu") == "float32"
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    assert precision.inference_dtype("cpu") == "bfloat16"
    with precision.inference_precision("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.Linear(4, 4)(torch.ones(1, 4))
    assert y.dtype == torch.bfloat16


def test_the_segmenter_map_in_bfloat16_is_close_to_float32_and_the_switch_restores_float32(tmp_path, monkeypatch):
    # emulated where the CPU has no bfloat16 instructions: the same arithmetic, only slower
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    seg = load_model(_segmenter_folder(tmp_path / "m"))
    rgb = fundus_rgb(4)
    fast = seg.probability(rgb)
    monkeypatch.setenv(precision.FLOAT32_ENV, "1")
    exact = seg.probability(rgb)
    assert fast.dtype == exact.dtype == np.float32
    diff = np.abs(fast - exact)
    assert 0 < diff.max() < 0.05  # bfloat16 did run, and stays within a few hundredths


def test_under_bfloat16_autocast_the_last_layers_and_probabilities_are_float32():
    from napari_retina.nets.patch_classifier import PatchClassifier
    from napari_retina.nets.segmentation import SegmentationNet

    torch.manual_seed(0)
    seg, prn = SegmentationNet("unet", 3, 4, 2).eval(), PatchClassifier().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = seg(torch.randn(1, 3, 32, 32), return_features=True)
        prn_logits, emb = prn(torch.randn(2, 3, 129, 129), return_embedding=True)
    assert features.dtype == torch.bfloat16  # the body did run in bfloat16
    assert logits.dtype == prn_logits.dtype == emb.dtype == torch.float32
