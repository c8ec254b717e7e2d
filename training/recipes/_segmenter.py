"""The whole-image lesion segmenter recipe, shared by `python -m training exudates` and `ma-hgn`.

A `Spec` (lesion, model kind, loss choices and defaults) makes one recipe of it: `exudates.py`
(the hard-exudate segmenter, patch-wise contrastive loss) and `ma_hgn.py` (the microaneurysm
hypothesis networks) each declare theirs.

    python -m training <exudates|ma-hgn> --data DIR [DIR ...] --out MODEL_DIR
        [--backbone unet|unetpp|resunet|cenet] [--loss ...] [--global-loss bce|wbce]
        [--scale S] [--epochs N | --minutes M] [--resume] [--init MODEL_DIR]

Whole images are held out for validation (split by image, named in the card). Training
patches are `--patch-size` px at the working scale `--scale` (the network's input at
inference too: half scale is a quarter of the pixels of a 4288 x 2848 photograph), half
centred on lesion pixels, half anywhere in the field of view (the patch-based paper's
balance), flipped, turned and colour-jittered.

Losses (--loss): `bce` plain BCE; `wbce` the class-weighted BCE of the patch-based paper
(lesion pixels weigh background/lesion pixel ratio of the batch); `wbce-dice` that plus soft
Dice; `contrastive` the global loss (--global-loss) + 0.02 x patch-wise density + 0.1 x
patch-wise edge-aware contrastive losses (Eq. 1; --alpha, --beta). A 256-px input is a
16 x 16 grid of 16-px cells, as in the paper; another patch size keeps the 16 x 16 grid
(cells of size/16 px).

Validation after every epoch: every held-out image whole, tiled exactly as inference runs,
scored by the area under the pixel-level precision-recall curve pooled over the field of
view at the working scale (`val_aupr`, the figure early stopping watches with --patience);
the threshold with the best pooled F1 there is stored. `napari-retina evaluate ex|ma --split
val` scores the same images at full resolution. Each improving epoch rewrites the model
folder (weights.safetensors, config.json, card.md); log and checkpoints live in
MODEL_DIR/run (--run-dir), --resume continues them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_retina import __version__
from napari_retina.io.errors import RetinaInputError

from ._main import (
    PATH_RULE, Preparation, add_optimisation_args, advice, add_run_args, data_names, ema_text, optimisation_kwargs,
    parent_record, parent_text, portable_command, precision, say_end, too_little_data,
)
from ..data import (
    DataError, SegmentationPatches, describe_labels, gather_records, labelled, load_scaled, parents_held_out,
    split_by_image, write_split,
)

BACKBONES = ("unet", "unetpp", "resunet", "cenet")


@dataclass(frozen=True)
class Spec:
    """What makes one whole-image segmenter recipe: its lesion, model kind and defaults."""

    name: str  # python -m training <name>
    kind: str  # `model` in config.json (the registry's kind)
    lesion: str
    title: str  # the card's title
    description: str
    losses: tuple[str, ...] = ("bce", "wbce", "contrastive")
    loss: str = "contrastive"
    backbone: str = "unet"
    base_channels: int = 16
    scale: float = 0.5
    preprocess: str = "none"
    rim_margin: float = 0.006
    lr: float = 1e-3
    half_inputs: bool = False  # keep training inputs as float16 (full-scale images: half the memory)
    # validate on levels of the logit rather than of the probability: a network trained with heavily
    # weighted lesions crowds its map near 1, where 256 probability levels cannot tell pixels apart
    val_logits: bool = False


def build_parser(spec: Spec) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m training {spec.name}", description=spec.description)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help=f"IDRiD-layout, flat or annotation project folders with {spec.lesion} masks")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--backbone", choices=BACKBONES, default=spec.backbone)
    p.add_argument("--base-channels", type=int, default=spec.base_channels, help="(default %(default)s)")
    p.add_argument("--depth", type=int, default=4, help="downsamplings of the backbone (default 4)")
    p.add_argument("--loss", choices=spec.losses, default=spec.loss,
                   help=("wbce-dice: class-weighted BCE + soft Dice; " if "wbce-dice" in spec.losses else
                         "contrastive: the global loss + patch-wise density and edge-aware terms; ")
                   + "(default %(default)s)")
    p.add_argument("--global-loss", choices=("bce", "wbce"), default="bce",
                   help="global term of --loss contrastive (default bce, as in the paper)")
    p.add_argument("--alpha", type=float, default=0.02, help="weight of the patch-wise density loss")
    p.add_argument("--beta", type=float, default=0.1, help="weight of the patch-wise edge-aware loss")
    p.add_argument("--scale", type=float, default=spec.scale,
                   help="working scale: network pixels per full-resolution pixel (default %(default)s)")
    p.add_argument("--patch-size", type=int, default=256, help="training patch side at the working scale")
    p.add_argument("--rim-margin", type=float, default=spec.rim_margin,
                   help="at inference, no candidates within this fraction of the field of view's width from "
                        "the dark surround (the aperture's bright edge; 0: off; default %(default)s)")
    add_run_args(p, init=f"start from this {spec.kind} model folder's weights", batch_size=8, lr=spec.lr,
                 samples=1000, samples_help="training patches per epoch (default %(default)s)", patience=10,
                 patience_help="early stopping on val_aupr (epochs without improvement)")
    add_optimisation_args(p)
    return p


def _validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.epochs is None and a.minutes is None:
        p.error("give --epochs N or --minutes M (or both)")
    if not 0.05 <= a.scale <= 1.0:
        p.error(f"--scale must lie between 0.05 and 1, not {a.scale}")
    if not 0 <= a.rim_margin < 0.25:
        p.error(f"--rim-margin must lie between 0 and 0.25, not {a.rim_margin}")
    if a.patch_size % 16 or a.patch_size % (2**a.depth) or a.patch_size < 32:
        p.error(f"--patch-size must be a multiple of 16 and of 2**depth, at least 32, not {a.patch_size}")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, not {a.val_fraction}")
    if a.patience < 1:
        p.error("--patience must be at least 1")


def scaled_predictions(net, images, tile: int, overlap: int, stride_multiple: int, device) -> list[np.ndarray]:
    """Each image's map at the working scale, tiled and in the arithmetic that inference runs
    (`inference_precision`: bfloat16 where the processor computes it natively, twice as fast)."""
    from napari_retina.models.precision import inference_precision
    from napari_retina.models.tiling import predict_tiled, torch_predictor

    predict = torch_predictor(net, device)
    out = []
    with inference_precision(device):
        for im in images:
            t = min(tile, -(-max(im.fov.shape) // stride_multiple) * stride_multiple)
            out.append(predict_tiled(predict, im.x, t, min(overlap, t // 2), fov=im.fov, batch=2,
                                     stride_multiple=stride_multiple)[0])
    return out


def validation_seconds(net, images, tile: int, overlap: int, stride_multiple: int, device) -> float:
    """About how long `scaled_predictions` takes over `images`: one batch of windows timed (after
    two to warm up), times the batches of every image. For the run's time budget."""
    from napari_retina.models.precision import inference_precision
    from napari_retina.models.tiling import plan_tiles, torch_predictor

    if not images:
        return 0.0
    predict = torch_predictor(net, device)
    im, batches = images[0], 0
    for other in images:
        t = min(tile, -(-max(other.fov.shape) // stride_multiple) * stride_multiple)
        batches += -(-len(plan_tiles(other.fov.shape, t, min(overlap, t // 2), other.fov, stride_multiple).origins) // 2)
    t = min(tile, -(-max(im.fov.shape) // stride_multiple) * stride_multiple)
    windows = np.zeros((2, im.x.shape[0], t, t), np.float32)
    windows[:, :, : min(t, im.x.shape[1]), : min(t, im.x.shape[2])] = im.x[:, :t, :t]
    with inference_precision(device):
        for _ in range(2):  # oneDNN sets the convolutions up over the first two calls (4x slower)
            predict(windows)
        t0 = time.monotonic()
        predict(windows)
        per_batch = time.monotonic() - t0
    return per_batch * batches + 0.02 * len(images)  # and scoring, per image


LOGIT_RANGE = 16.0  # float32 probabilities resolve logits to about +-16
LOGIT_LEVELS = 2048  # levels over [-16, 16]: 1/64 of a logit each


def score_scaled(probs, images, logits: bool = False) -> dict:
    """Pooled pixel AUPR at the working scale and the threshold with the best pooled F1.

    On the 256 probability levels a stored map has (the IDRiD convention), or with `logits` on
    `LOGIT_LEVELS` levels of the logit over +-`LOGIT_RANGE`: the same ranking of pixels, resolved
    where the map crowds near 0 or 1 (AUPR only depends on that ranking and on the levels' width).
    """
    from napari_retina.metrics import PixelPR

    levels = LOGIT_LEVELS + 1 if logits else 256
    pr = PixelPR(bins=levels)
    for prob, im in zip(probs, images):
        p = np.clip(np.asarray(prob, np.float64), 0, 1)
        if logits:  # the logit, mapped onto [0, 1] for PixelPR's levels
            q = np.clip(p, 1e-12, 1 - 1e-12)
            p = np.clip((np.log(q) - np.log1p(-q) + LOGIT_RANGE) / (2 * LOGIT_RANGE), 0, 1)
        pr.add(p, im.target >= 0.5, region=im.fov)
    best_f1, best_t = -1.0, 0.5
    for level in range(1, levels - 1):
        tp, fp, fn, _ = pr.counts(level)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        if f1 > best_f1:
            # half a level below: p >= t then keeps exactly the levels >= `level` (metrics.level_threshold)
            best_f1, best_t = f1, (level - 0.5) / (levels - 1)
    if logits:  # back from the logit's level to a probability
        best_t = float(1 / (1 + np.exp(-(best_t * 2 * LOGIT_RANGE - LOGIT_RANGE))))
    aupr = pr.aupr()
    return {"aupr": 0.0 if np.isnan(aupr) else aupr, "f1": best_f1, "threshold": best_t}


def model_config(net, info: dict, metrics: dict, trainer) -> dict:
    parent = info.get("parent_training") or {}
    epochs_here = int(metrics["epoch"])
    minutes_here = trainer.training_seconds / 60
    return {
        "model": info["kind"],
        "lesion": info["lesion"],
        "preprocess": info["preprocess"],
        "version": info["version"],
        "net": net.config(),
        "input_scale": info["scale"],
        "tile": 512,
        "overlap": 128,
        "normalisation": "per-image standardisation over the field of view (models.segmenter.network_input)",
        "threshold": round(float(metrics.get("val_threshold", 0.5)), 6),
        "rim_margin": info["rim_margin"],
        "validation_images": info["validation_images"],
        "training": {
            "epochs": int(parent.get("epochs", 0)) + epochs_here,
            "best_epoch": int(parent.get("epochs", 0)) + epochs_here,
            "minutes": round(float(parent.get("minutes", 0.0)) + minutes_here, 1),
            "device": str(trainer.device),
            "precision": precision(trainer),
            "loss": info["loss"],
            "ema_decay": info.get("ema_decay"),
            "val_levels": "logit" if info.get("val_logits") else "probability (256)",
            "val_aupr_working_scale": round(float(metrics.get("val_aupr", float("nan"))), 4),
            "val_f1_working_scale": round(float(metrics.get("val_f1", float("nan"))), 4),
            "early_stopping_patience": info["patience"],
            "data": info["data"],
            "command": info["command"],
            "paths": PATH_RULE,
            "parent": info.get("parent"),
            "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def render_card(config: dict, info: dict) -> str:
    t = config["training"]
    ema = ema_text(info.get("ema_decay"))
    rim = (f" No candidates within {config['rim_margin']} of the field of view's width\nof the dark surround "
           "(the aperture's bright edge; `rim_margin` in config.json).") if config.get("rim_margin") else ""
    if config["model"] == "ma-hgn":
        full = ("One of the microaneurysm detector's two hypothesis networks: assembled with `python -m training "
                "microaneurysms`,\nthe detector is scored with `napari-retina evaluate ma --data DIR --model "
                "DETECTOR --split val`.")
    else:
        full = f"Full resolution: `napari-retina evaluate {config['lesion'].lower()} --data DIR --model THIS_FOLDER --split val`."
    return f"""# {info['title']} ({config['net']['backbone']}, {t['loss']}) {config['version']}

Maps {config['lesion']} in a colour fundus photograph: a {config['net']['backbone']} backbone trained from
scratch by napari-retina {__version__} with {t['loss']}, run at {config['input_scale']} of full resolution
(input preprocessing: {config.get('preprocess', 'none')}),
tiled over the field of view.{rim}

## Training

- Data: {', '.join(info['data'])} ({info['train_count']} training images, {len(config['validation_images'])} validation images)
- Patches: {info['patch_size']} px at scale {config['input_scale']}, half centred on lesion pixels; {info['samples_per_epoch']} per epoch,
  batch {info['batch_size']}, {info.get('optimizer', 'Adam')} lr {info['lr']}{ema}
- Epochs: {t['epochs']} (best epoch {t['best_epoch']}), {t['minutes']:.0f} min on {t['device']} ({platform.machine()}, torch {info['torch']}){' in ' + t['precision'] if t.get('precision') else ''}
- Early stopping: pooled pixel AUPR on the validation images, patience {t['early_stopping_patience']} epochs
- Parent model: {parent_text(t['parent'])}
- Command: `{t['command']}` ({PATH_RULE})

## Validation (working scale, pooled over the field of view{', on levels of the logit' if info.get('val_logits') else ''})

| AUPR | best F1 | threshold |
|---|---|---|
| {t['val_aupr_working_scale']:.3f} | {t['val_f1_working_scale']:.3f} | {config['threshold']:.3f} |

{full}

Validation images (held out by image): {', '.join(config['validation_images'])}

## Checksum

weights.safetensors SHA-256: {{sha256}}
"""


def run(a: argparse.Namespace, argv: list[str], spec: Spec) -> int:
    import torch

    from napari_retina.models.folder import load_state_dict, write_model_folder
    from napari_retina.models.registry import check_model_folder
    from napari_retina.nets.segmentation import SegmentationNet
    from training.losses import ExudateLoss, dice_loss
    from training.trainer import Trainer, is_main_process

    out = Path(a.out)
    run_dir = Path(a.run_dir) if a.run_dir else out / "run"
    main_process = is_main_process()  # under torchrun, one process speaks
    say = (lambda *x: None) if a.quiet or not main_process else (lambda *x: print(*x, flush=True))
    from training.trainer import RunBudget, open_run_log

    budget = getattr(a, "budget", None) or RunBudget(a.minutes)
    records = labelled(gather_records(a.data), [spec.lesion])  # images without a label teach nothing
    parent_config = check_model_folder(Path(a.init), expect=spec.kind) if a.init else None
    split_file = run_dir / "split.json"
    val_names = a.val_images
    if a.resume and split_file.is_file() and not val_names:
        val_names = json.loads(split_file.read_text())["val"]
    elif parent_config and not val_names:
        val_names = parents_held_out(parent_config, records)  # those of the parent's held-out images that are here
    if parent_config and float(parent_config.get("input_scale", a.scale)) != a.scale:
        raise DataError(f"--init {a.init}: a model at scale {parent_config.get('input_scale')}, not {a.scale}")
    if len(records) < 2 and not val_names:
        raise too_little_data(spec.lesion, [r.image.name for r in records])
    train_recs, val_recs = split_by_image(records, a.val_fraction, a.seed, val_names)
    if not val_recs:
        raise too_little_data(spec.lesion, [r.image.name for r in records])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_split(split_file, train_recs, val_recs)
    log = open_run_log(run_dir, a.resume)  # the preparation's progress first, then the trainer's
    t0 = time.monotonic()
    dtype = np.float16 if spec.half_inputs else np.float32
    say(describe_labels(train_recs + val_recs, [spec.lesion]))
    todo = train_recs + val_recs
    prepared = Preparation(log, budget, len(todo))  # progress (and what is left of it) while the images load
    loaded = [(load_scaled(r, spec.lesion, a.scale, spec.preprocess, dtype), prepared(i + 1))[0]
              for i, r in enumerate(todo)]
    train_imgs = [im for im in loaded[: len(train_recs)] if im is not None]
    val_imgs = [im for im in loaded[len(train_recs):] if im is not None]
    if not val_imgs:
        raise DataError(f"none of the validation images ({', '.join(r.image.name for r in val_recs)}) has a "
                        f"{spec.lesion} label: {advice(spec.lesion)}")
    if not any(len(im.lesion_px) for im in train_imgs):
        raise DataError(f"no {spec.lesion} in the training images' masks: {advice(spec.lesion)}")
    say(f"{len(train_imgs)} training images ({sum(len(im.lesion_px) > 0 for im in train_imgs)} with {spec.lesion}), "
        f"{len(val_imgs)} validation images at scale {a.scale}; loaded in {time.monotonic() - t0:.0f} s")
    train_set = SegmentationPatches(train_imgs, a.patch_size, augment=True, seed=a.seed, length=a.samples_per_epoch)

    from training.trainer import seed_everything

    seed_everything(a.seed)  # the same seed gives the same initial weights, hence the same run
    net = SegmentationNet(backbone=a.backbone, base_channels=a.base_channels, depth=a.depth)
    if a.init:
        try:
            net.load_state_dict(load_state_dict(Path(a.init)), strict=True)
        except RuntimeError as e:
            raise RetinaInputError(f"--init {a.init}: weights do not fit this network ({str(e).splitlines()[0]})") from None
    if a.loss == "contrastive":
        criterion = ExudateLoss(alpha=a.alpha, beta=a.beta, global_loss=a.global_loss)
    else:
        criterion = ExudateLoss(alpha=0.0, beta=0.0, global_loss="wbce" if a.loss.startswith("wbce") else "bce")
    with_dice = a.loss == "wbce-dice"

    def loss_fn(outputs, batch):
        logits, features = outputs
        total, _ = criterion(logits, features, batch["target"], mask=batch["fov"])
        if with_dice:
            total = total + dice_loss(logits, batch["target"], mask=batch["fov"])
        return total

    def forward_fn(model, batch):
        # through the (possibly DDP-wrapped) module's own forward, so gradients are synchronised
        return model(batch["image"], return_features=True)

    stride = 2**a.depth

    def val_fn(model, _val_set, device) -> dict:
        return score_scaled(scaled_predictions(model, val_imgs, 512, 128, stride, device), val_imgs,
                            logits=spec.val_logits)

    info = {
        "version": a.version or datetime.date.today().strftime(f"%Y.%m.%d-{spec.kind}"),
        "kind": spec.kind,
        "lesion": spec.lesion,
        "title": spec.title,
        "preprocess": spec.preprocess,
        "val_logits": spec.val_logits,
        "data": data_names(a.data),
        "train_count": len(train_imgs),
        "validation_images": [r.image.name for r in val_recs],
        "scale": a.scale,
        "rim_margin": a.rim_margin,
        "loss": {"contrastive": f"{a.global_loss} + {a.alpha} density + {a.beta} edge",
                 "wbce-dice": "weighted BCE + soft Dice"}.get(a.loss, a.loss),
        "patch_size": a.patch_size,
        "samples_per_epoch": a.samples_per_epoch,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "ema_decay": a.ema,
        "optimizer": {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}.get(a.optimizer, a.optimizer),
        "patience": a.patience,
        "parent": parent_record(parent_config),
        "parent_training": dict(parent_config.get("training", {})) if parent_config else None,
        "torch": torch.__version__,
        "command": portable_command(f"python -m training {spec.name}", argv),
    }

    def export(trainer, metrics):
        if not metrics["is_best"]:
            return
        state = {k: v.detach().cpu() for k, v in trainer.eval_module.state_dict().items()}
        config = model_config(trainer.eval_module, info, metrics, trainer)
        write_model_folder(out, state, config, render_card(config, info))

    trainer = Trainer(
        net, loss_fn, train_set, None, run_dir, **optimisation_kwargs(a),
        device=a.device, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs, minutes=a.minutes,
        num_workers=a.workers, seed=a.seed, val_fn=val_fn, monitor="val_aupr", mode="max",
        lr_patience=max(1, a.patience // 2), early_stop_patience=a.patience, forward_fn=forward_fn,
        on_epoch_end=[export], info={k: info[k] for k in ("version", "data", "command", "loss")},
        verbose=not a.quiet, budget=budget, log=log,
    )
    if budget.seconds is not None and is_main_process():  # the closing's time, before the first one is measured
        budget.expect_closing(validation_seconds(trainer.eval_module, val_imgs, 512, 128, stride, trainer.device))
    summary = trainer.fit(resume=a.resume)
    say_end(say, summary, out, "val AUPR {:.3f} at the working scale")
    return 0


def main_for(spec: Spec, argv: list[str] | None = None) -> int:
    from ._main import recipe_main

    return recipe_main(spec.name, lambda: build_parser(spec), _validate_args, lambda a, av: run(a, av, spec), argv)
