"""python -m training exudates: train the hard-exudate segmenter.

    python -m training exudates --data DIR [DIR ...] --out MODEL_DIR
        [--backbone unet|unetpp|resunet|cenet] [--loss bce|wbce|contrastive] [--global-loss bce|wbce]
        [--scale 0.5] [--epochs N | --minutes M] [--resume] [--init MODEL_DIR]

After Tang, Wang, Cui and Chan, "A Global and Patch-wise Contrastive Loss for Accurate Automated
Exudate Detection" (arXiv:2302.11517, 2023), with the patch-based training of Popli, Jindal,
Pillai, Khan, Agarwal and Yadav, "Automated Hard Exudates Segmentation in Retinal Images Using
Patch Based U-Net" (IIT Roorkee): the whole-image segmenter recipe (`_segmenter.py`:
patches, augmentation, tiled whole-image validation, model folder) with the exudate spec:
U-Net, the patch-wise contrastive loss (global BCE + 0.02 x density + 0.1 x edge-aware), half
scale, and no candidates on the aperture's bright rim (`--rim-margin`).
"""

from __future__ import annotations

from ._segmenter import Spec, main_for

EXUDATES = Spec(
    name="exudates", kind="exudates", lesion="EX", title="Hard-exudate segmenter",
    description="Train the hard-exudate segmenter (patch-wise contrastive loss) from lesion masks.",
)


def main(argv: list[str] | None = None) -> int:
    return main_for(EXUDATES, argv)
