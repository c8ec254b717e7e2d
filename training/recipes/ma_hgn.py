"""python -m training ma-hgn: train one microaneurysm hypothesis generation network (HGN).

    python -m training ma-hgn --data DIR [DIR ...] --out MODEL_DIR --scale 1.0|0.5
        [--backbone resunet|unet|unetpp|cenet] [--loss wbce-dice|wbce|bce] [--epochs N | --minutes M] ...

The paper (Sarhan, Albarqouni, Yigitsoy, Navab and Eslami, "Multi-scale Microaneurysms
Segmentation Using Embedding Triplet Loss", MICCAI 2019, section 2) trains two fully
convolutional networks on 256 x 256 patches of the contrast-enhanced photograph, one at full
and one at half scale, with weighted cross-entropy plus soft Dice. This is the exudate
segmenter's recipe (`training.recipes._segmenter`: patches, augmentation, whole-image tiled
validation by pooled pixel AUPR, early stopping, model folder) with the microaneurysm spec:

- input: `subtract_local_background` (4 I - 4 G * I + 128) at full resolution, then the working scale
  (`preprocess: enhance` in config.json, so inference prepares images the same way);
- loss: class-weighted BCE (lesion pixels weigh the batch's background/lesion ratio) + soft
  Dice, over the field of view;
- backbone: ResUnet by default. The paper's full-resolution residual network (FRRN type A)
  keeps a full-resolution residual stream beside a pooling stream; ResUnet (residual units,
  full-resolution skip connections) is the closest of the four backbones written here. At
  full scale a 4288 x 2848 photograph is 12 M network pixels, so the default is 8 base
  channels (0.5 M parameters): 16 would take four times the time the 30 s speed target
  leaves (`benchmarks/segment_speed.py --lesion MA --base-channels 8`);
- patches: half centred on microaneurysm pixels, half anywhere in the field of view. The
  paper draws healthy patches from healthy patients' images; every IDRiD segmentation image
  has microaneurysms, and microaneurysms cover about 0.05 % of the field of view, so a
  random patch is almost always microaneurysm-free in its bulk (its few lesion pixels keep
  their label rather than being taught as healthy).

Run it twice, `--scale 1.0` and `--scale 0.5`, into two model folders; `python -m training
ma-prn` trains the refinement network and `python -m training microaneurysms` assembles the
three into the detector's model folder.
"""

from __future__ import annotations

from ._segmenter import Spec, main_for

MA_HGN = Spec(
    name="ma-hgn", kind="ma-hgn", lesion="MA", title="Microaneurysm hypothesis network",
    description="Train a microaneurysm hypothesis generation network (one scale) on contrast-enhanced patches.",
    losses=("wbce-dice", "wbce", "bce"), loss="wbce-dice", backbone="resunet", base_channels=8, scale=1.0,
    preprocess="enhance",
    rim_margin=0.0, lr=1e-3, half_inputs=True, val_logits=True,
)


def main(argv: list[str] | None = None) -> int:
    return main_for(MA_HGN, argv)
