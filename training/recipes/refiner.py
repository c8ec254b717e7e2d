"""python -m training refiner: train the coarse-ellipse refinement network.

    python -m training refiner --data DIR [DIR ...] --out MODEL_DIR
        [--variant prototype|baseline] [--device auto|cpu|cuda] [--epochs N | --minutes M] [--resume]

Coarse ellipses are simulated from the fine masks of every IDRiD-layout, flat or
annotation project folder given (paper 3.1), at several reduction factors (one
ellipse over several lesion groups, as graders draw); whole images are held out
for validation, and patches around the ellipses train the network with Dice +
BCE, Adam and ReduceLROnPlateau (paper 2 and 3.1). No patch is coarser than
--max-scale full-resolution pixels per network pixel: a larger ellipse gives a
window of itself at that scale, as inference refines it.

Validation is the image-level IoU average on the held-out images, the figure
`napari-retina evaluate refine --split val` prints; training stops early when it
has not improved for --patience epochs. After every epoch that improves it the
model folder (weights.safetensors, config.json, card.md) is written to MODEL_DIR,
so a stopped run always leaves a usable model; at the end the superpixel
weighting is decided on the same images. The run's log (log.jsonl), checkpoints
and split live in MODEL_DIR/run unless --run-dir says otherwise; --resume
continues from its last checkpoint; --init MODEL_DIR fine-tunes a model folder
and keeps counting its epochs and hours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

from dataclasses import dataclass

import numpy as np

from napari_retina import __version__
from napari_retina.io.errors import RetinaInputError

from ._main import (
    PATH_RULE, add_optimisation_args, add_run_args, data_names, ema_text, optimisation_kwargs, parent_record,
    parent_text, portable_command, precision,
)
from ..data import (
    REFINER_LESIONS,
    DataError,
    RefinerPatches,
    describe_labels,
    parents_held_out,
    gather_records,
    labelled,
    load_image,
    simulate_samples,
    split_by_image,
    write_split,
)

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training refiner",
        description="Train the ellipse refinement network (prototype or baseline) from lesion masks.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="IDRiD-layout, flat or annotation project folders with lesion masks")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--variant", choices=("prototype", "baseline"), default="prototype")
    p.add_argument("--train-superpixels", choices=("on", "off"), default="on",
                   help="prototype variant: train with the superpixel-guided weighting (paper 2.2; about 15%% slower "
                        "per step on a CPU) or without it; both forms are validated at export either way")
    p.add_argument("--smooth-logits", choices=("on", "off"), default="on",
                   help="3x3 binomial filter on the 1/4-scale logits: removes the period-2 grid the stride-2 decoder "
                        "leaves where the probability hovers near the threshold (default on)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm (the prototype head's alpha = 20 makes early gradients spiky); 0: off")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels (multiple of 8)")
    p.add_argument("--reduction", type=float, nargs="+", default=[1.0, 1.5, 2.0],
                   help="reduction factors of the simulated training ellipses, one set per factor "
                        "(default 1.0 1.5 2.0: graders circle groups of lesions too; validation: --val-reduction)")
    p.add_argument("--max-scale", type=float, default=2.0,
                   help="largest full-resolution pixels per network pixel: larger ellipses are trained and "
                        "refined window by window at this scale (default 2.0)")
    p.add_argument("--val-reduction", type=float, nargs="+", default=[1.0],
                   help="reduction(s) of the validation ellipses (default 1.0); with several, early stopping and "
                        "the threshold follow the mean of their image-level averages, e.g. 1.0 2.0 for graders "
                        "who also circle groups of lesions")
    p.add_argument("--base-channels", type=int, default=16)
    add_run_args(p, init="start from this model folder's weights (fine-tuning)", batch_size=8, lr=1e-4,
                 lr_help="Adam learning rate (paper: 1e-4)", samples=2000, samples_help="training patches per epoch",
                 patience=8, patience_help="stop when the image-level validation IoU has not improved for this many "
                                           "epochs (default 8)")
    add_optimisation_args(p)
    return p


def _validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.epochs is None and a.minutes is None:
        p.error("give --epochs N or --minutes M (or both)")
    if a.patch_size < 32 or a.patch_size % 8:
        p.error(f"--patch-size must be a multiple of 8 and at least 32, not {a.patch_size}")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, not {a.val_fraction}")
    if any(not r >= 1.0 for r in a.reduction):
        p.error("--reduction factors must be >= 1.0")
    if any(not r >= 1.0 for r in a.val_reduction):
        p.error("--val-reduction factors must be >= 1.0")
    if a.samples_per_epoch < 1:
        p.error("--samples-per-epoch must be at least 1")
    if not a.max_scale > 0:
        p.error(f"--max-scale must be positive, not {a.max_scale}")
    if a.patience < 1:
        p.error(f"--patience must be at least 1, not {a.patience}")


@dataclass
class ValImage:
    """One validation image with its fine masks and the coarse ellipses simulated from them."""

    stem: str
    rgb: np.ndarray
    masks: dict  # lesion -> bool mask
    ellipses: dict  # lesion -> [Ellipse]
    reduction: float = 1.0  # the reduction the ellipses were simulated at


def validation_images(images, reductions, seed: int) -> list[ValImage]:
    """The split's images with their ellipses, simulated once (as `evaluate refine` does: seed + k),
    once per reduction factor (the photograph and masks shared, not copied)."""
    from napari_retina.coarse import simulate_coarse_ellipses

    out = []
    for r in reductions:
        for k, img in enumerate(images):
            ells = {c: simulate_coarse_ellipses(m, c, reduction=r, seed=seed + k) for c, m in img.masks.items()}
            out.append(ValImage(img.stem, img.rgb, img.masks, ells, float(r)))
    return out


def reduction_tables(refiner, val_images: list[ValImage], thresholds=THRESHOLDS, superpixels=None) -> dict:
    """{reduction: {lesion: image-level IoU (%) at each threshold}}: the figures `evaluate refine` prints.

    Each image's probability map is computed once and thresholded at every candidate; the
    IoU rule is `metrics.image_level_iou` (an image counts where the lesion or a prediction is).
    """
    from napari_retina.metrics import image_level_iou

    pairs: dict[float, dict] = {}
    for v in val_images:
        per = pairs.setdefault(v.reduction, {c: [[] for _ in thresholds] for c in REFINER_LESIONS})
        for code, ells in v.ellipses.items():
            if not ells:
                continue
            prob = refiner.refine_probability(v.rgb, ells, superpixels=superpixels)
            for j, t in enumerate(thresholds):
                per[code][j].append((prob >= t, v.masks[code]))
    return {
        r: {code: [100.0 * image_level_iou(p)[0] for p in per_t] for code, per_t in per.items() if per_t[0]}
        for r, per in pairs.items()
    }


def mean_table(tables: dict) -> dict:
    """Per lesion and threshold, the mean over the reductions (a lesion missing at one is left out there)."""
    codes = [c for c in REFINER_LESIONS if any(c in t for t in tables.values())]
    return {c: list(np.mean([t[c] for t in tables.values() if c in t], axis=0)) for c in codes}


def validation_figures(refiner, val_images: list[ValImage], thresholds=THRESHOLDS, superpixels=None) -> dict:
    """`best_threshold` of the reduction-averaged table, plus each reduction's average there (`iou_r<R>`)."""
    tables = reduction_tables(refiner, val_images, thresholds, superpixels)
    out = best_threshold(mean_table(tables), thresholds)
    if len(tables) > 1:
        k = list(thresholds).index(out["threshold"])
        out.update({f"iou_r{r:g}": float(np.mean([v[k] for v in t.values()])) for r, t in sorted(tables.items())})
    return out


def best_threshold(table: dict, thresholds=THRESHOLDS) -> dict:
    """The threshold with the best mean IoU over the lesions, and the figures there."""
    macro = np.mean([table[c] for c in table], axis=0)  # per threshold
    k = int(np.argmax(macro))
    out = {"iou": float(macro[k]), "threshold": float(thresholds[k])}
    out.update({f"iou_{c}": float(v[k]) for c, v in table.items()})
    return out


def make_val_fn(val_images: list[ValImage], config_of, thresholds=THRESHOLDS):
    """Validation = the image-level average on the held-out images (early stopping monitors it)."""

    def val_fn(model, _val_set, device) -> dict:
        from napari_retina.models.refiner import EllipseRefiner

        # a fresh refiner each epoch: its TorchScript traces hold this epoch's weights
        refiner = EllipseRefiner.from_network(model, config_of(), device=str(device), superpixels=False)
        try:
            return validation_figures(refiner, val_images, thresholds, superpixels=False)
        finally:
            model.train()  # the trainer restores the mode too; be explicit since from_network sets eval

    return val_fn


def superpixel_choice(net, config: dict, val_images: list[ValImage], device, plain: dict) -> dict:
    """Validate the best weights with the superpixel weighting too and ship the better form (paper 2.2).

    The weighting is a switch at inference, so both forms are measured on the same images.
    """
    from napari_retina.models.refiner import EllipseRefiner

    refiner = EllipseRefiner.from_network(net, config, device=str(device), superpixels=True)
    sp = validation_figures(refiner, val_images, superpixels=True)
    # compared as the card shows them (2 decimals): the plain figure comes rounded from config.json
    chosen = sp if round(sp["iou"], 2) > round(plain["iou"], 2) else plain
    return {
        "superpixels": chosen is sp,
        "threshold": chosen["threshold"],
        "val_image_iou_plain": round(float(plain["iou"]), 2),
        "val_image_iou_superpixels": round(float(sp["iou"]), 2),
        **{f"val_image_iou_{c}": round(float(chosen[f'iou_{c}']), 2) for c in REFINER_LESIONS if f"iou_{c}" in chosen},
        **{f"val_image_iou_{k[4:]}": round(float(v), 2) for k, v in chosen.items() if k.startswith("iou_r")},
    }


def render_card(config: dict, info: dict) -> str:
    t = config["training"]
    ema = ema_text(info.get("ema_decay"))
    val = config["validation_images"]
    figures = "\n".join(f"| {c} | {t.get(f'val_image_iou_{c}', float('nan')):.1f} |" for c in REFINER_LESIONS)
    sp = t.get("val_image_iou_superpixels")
    sp_line = (
        f"decided on the validation images at the end of training: {t['val_image_iou_superpixels']:.1f} with the "
        f"weighting, {t['val_image_iou_plain']:.1f} without; shipped **{'on' if config['superpixels'] else 'off'}**."
        if sp is not None else "not yet decided (training stopped before the end-of-run comparison); shipped off."
    )
    parent = info.get("parent_training") or {}
    history = (
        f"- Parent model: {parent_text(info['parent'])} ({parent.get('epochs', '?')} epochs, {parent.get('minutes', '?')} "
        f"min on {parent.get('device', '?')}); the counts below include its training\n"
        if info.get("parent") else "- Parent model: none (trained from scratch)\n"
    )
    geom = config["geometry"]
    several = isinstance(t["val_reduction"], list)  # one factor is kept as a number, as in older folders
    reductions = (f"reductions {', '.join(str(r) for r in t['val_reduction'])}, each figure the mean over them"
                  if several else f"reduction {t['val_reduction']}")
    same = (
        "Each reduction's average is the figure `napari-retina evaluate refine --data DIR --model THIS_FOLDER "
        "--split val` prints for it under `by_reduction`." if several else
        "The same figure as `napari-retina evaluate refine --data DIR --model THIS_FOLDER --split val`."
    )
    per_reduction = "".join(
        f"| average at reduction {k[len('val_image_iou_r'):]} | {v:.1f} |\n"
        for k, v in t.items() if k.startswith("val_image_iou_r")
    )
    return f"""# Ellipse refinement model ({info['variant']}) {config['version']}

Turns a coarse ellipse around a lesion (MA, SE, EX, HE) into a pixel mask:
{('a prototype network (superpixel-guided weighting ' + ('on' if config.get('superpixels') else 'off') + ' at inference, decided on validation)') if info['variant'] == 'prototype' else 'the non-prototypical baseline (1x1 conv classifier)'}
on a truncated U-Net, trained by napari-retina {__version__}.

## Training

- Data: {', '.join(info['data'])} ({info['train_count']} training images, {len(val)} validation images)
- Coarse ellipses: simulated from the fine masks at reductions {', '.join(str(r) for r in info['reduction'])}, seed {info['seed']}
- Patches: {geom['size']}x{geom['size']}, at most {geom['max_scale']} full-resolution pixels per network pixel (larger
  ellipses: windows at that scale), {info['samples_per_epoch']} per epoch, batch {info['batch_size']}, Adam lr {info['lr']},{ema}
  gradient norm clipped at {info['grad_clip'] or 'off'}
{history}- Epochs: {t['epochs']} in all (best epoch {t['best_epoch']}), training time {t['minutes']:.0f} min in all ({t['minutes'] / 60:.1f} h)
- Device: {t['device']} ({platform.machine()}, torch {info['torch']}){', ' + t['precision'] if t.get('precision') else ''}
- Early stopping: on the image-level validation average below, patience {t['early_stopping_patience']} epochs
- Command: `{t['command']}` ({PATH_RULE})

## Validation (image-level IoU %, coarse ellipses at {reductions}, threshold {config['threshold']:.2f})

| Lesion | IoU |
|---|---|
{figures}
| average | {t.get('val_image_iou', float('nan')):.1f} |
{per_reduction}
{same}

Superpixel-guided weighting at inference: {sp_line}

Validation images (held out by image): {', '.join(val)}

## Checksum

weights.safetensors SHA-256: {{sha256}}
"""


def model_config(net, info: dict, geom, metrics: dict, trainer, choice: dict | None = None) -> dict:
    """config.json of the model folder for the trainer's current weights."""
    parent = info.get("parent_training") or {}
    epochs_here = int(metrics["epoch"])
    minutes_here = trainer.training_seconds / 60
    choice = choice or {}
    return {
        "model": "refiner",
        "version": info["version"],
        "net": net.config(),
        "geometry": geom.to_dict(),
        "normalisation": {"mean": NORM["mean"], "scale": NORM["scale"], "channels": "RGB"},
        "threshold": round(float(choice.get("threshold", metrics.get("val_threshold", 0.5))), 3),
        "superpixels": bool(choice.get("superpixels", False)),
        "lesions": list(REFINER_LESIONS),
        "validation_images": info["validation_images"],
        "training": {
            "epochs": int(parent.get("epochs", 0)) + epochs_here,
            "best_epoch": int(parent.get("epochs", 0)) + epochs_here,
            "epochs_this_run": epochs_here,
            "minutes": round(float(parent.get("minutes", 0.0)) + minutes_here, 1),
            "device": str(trainer.device),
            "precision": precision(trainer),
            "val_reduction": info["val_reduction"],
            "ema_decay": info.get("ema_decay"),
            "val_image_iou": round(float(metrics.get("val_iou", float("nan"))), 2),
            **{f"val_image_iou_{c}": round(float(metrics[f"val_iou_{c}"]), 2) for c in REFINER_LESIONS if f"val_iou_{c}" in metrics},
            **{f"val_image_iou_{k[8:]}": round(float(v), 2) for k, v in metrics.items() if k.startswith("val_iou_r")},
            **{k: v for k, v in choice.items() if k.startswith("val_")},
            "early_stopping_patience": info["patience"],
            "data": info["data"],
            "command": info["command"],
            "paths": PATH_RULE,
            "parent": info.get("parent"),
            "parent_version": parent.get("version"),
            "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


NORM = {"mean": 127.5, "scale": 63.75}


def export_model(trainer, metrics: dict, out: Path, info: dict, geom) -> None:
    """Write the model folder from the trainer's current weights (called on each best epoch)."""
    from napari_retina.models.folder import write_model_folder

    net = trainer.eval_module
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    config = model_config(net, info, geom, metrics, trainer)
    write_model_folder(out, state, config, render_card(config, info))


def finish_model(out: Path, info: dict, val_images, device) -> dict | None:
    """After training: decide the superpixel weighting on the best weights and rewrite the folder."""
    import json as _json

    from napari_retina.models.folder import CONFIG, load_state_dict, write_model_folder
    from napari_retina.nets.refiner import RefinerNet

    if not (out / CONFIG).is_file():
        return None
    config = _json.loads((out / CONFIG).read_text())
    if info["variant"] != "prototype":
        return config
    state = load_state_dict(out)
    net = RefinerNet.from_config(config["net"])
    net.load_state_dict(state)
    t = config["training"]
    plain = {"iou": t["val_image_iou"], "threshold": config["threshold"],
             **{f"iou_{c}": t[f"val_image_iou_{c}"] for c in REFINER_LESIONS if f"val_image_iou_{c}" in t}}
    choice = superpixel_choice(net, config, val_images, device, plain)
    config["superpixels"], config["threshold"] = choice["superpixels"], choice["threshold"]
    config["training"].update({k: v for k, v in choice.items() if k.startswith("val_")})
    config.pop("weights_sha256", None)
    config.pop("weights_dtype", None)
    write_model_folder(out, state, config, render_card(config, info))
    return config


def run(a: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from napari_retina.models.folder import load_state_dict
    from napari_retina.models.registry import check_model_folder
    from napari_retina.models.patches import PatchGeometry
    from napari_retina.nets.refiner import RefinerNet
    from training.losses import bce_dice_loss
    from training.trainer import Trainer, is_main_process

    out = Path(a.out)
    run_dir = Path(a.run_dir) if a.run_dir else out / "run"
    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))

    from training.trainer import RunBudget, open_run_log

    from ._main import Preparation, advice, too_little_data

    budget = getattr(a, "budget", None) or RunBudget(a.minutes)
    budget.finish_factor = 3.0 if a.variant == "prototype" else 1.0  # finish_model validates again, with superpixels
    records = labelled(gather_records(a.data), REFINER_LESIONS)  # images without a label teach nothing
    split_file = run_dir / "split.json"
    val_names = a.val_images
    # through the registry's checks: a refiner folder whose weights match their checksum
    parent_config = check_model_folder(Path(a.init), expect="refiner") if a.init else None
    if a.resume and split_file.is_file() and not val_names:
        val_names = json.loads(split_file.read_text())["val"]  # a resumed run keeps its split
    elif parent_config and not val_names:
        val_names = parents_held_out(parent_config, records)  # fine-tuning keeps the parent's held-out images
    lesions = ", ".join(REFINER_LESIONS)
    if len(records) < 2 and not val_names:
        raise too_little_data(lesions, [r.image.name for r in records])
    train_recs, val_recs = split_by_image(records, a.val_fraction, a.seed, val_names)
    if not val_recs:
        raise too_little_data(lesions, [r.image.name for r in records])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_split(split_file, train_recs, val_recs)
    log = open_run_log(run_dir, a.resume)  # the preparation's progress first, then the trainer's

    t0 = time.monotonic()
    say(describe_labels(train_recs + val_recs, REFINER_LESIONS))
    prepared = Preparation(log, budget, len(train_recs) + len(val_recs))
    loaded = [(load_image(r), prepared(i + 1))[0] for i, r in enumerate(train_recs + val_recs)]
    train_imgs, val_imgs = loaded[: len(train_recs)], loaded[len(train_recs):]
    train_samples = [s for red in a.reduction for s in simulate_samples(train_imgs, red, a.seed)]
    val_images = validation_images(val_imgs, a.val_reduction, a.seed)
    if not train_samples:
        raise DataError(f"no lesions ({lesions}) in the training images' masks: {advice(lesions)}")
    if not any(e for v in val_images for e in v.ellipses.values()):
        raise DataError(f"no lesions in the validation images' masks: {advice(lesions)}")
    counts = {c: sum(s.ellipse.lesion == c for s in train_samples) for c in REFINER_LESIONS}
    say(f"{len(train_imgs)} training images ({', '.join(f'{c} {n}' for c, n in counts.items())} ellipses), "
        f"{len(val_imgs)} validation images; loaded in {time.monotonic() - t0:.0f} s")

    geom = PatchGeometry(size=a.patch_size, max_scale=a.max_scale)
    train_set = RefinerPatches(train_imgs, train_samples, geom, augment=True, seed=a.seed, length=a.samples_per_epoch)

    from training.trainer import seed_everything

    seed_everything(a.seed)  # the same seed gives the same initial weights, hence the same run
    net = RefinerNet(
        base_channels=a.base_channels, variant=a.variant,
        superpixels=a.variant == "prototype" and a.train_superpixels == "on",
        smooth_logits=a.smooth_logits == "on",
    )
    if a.init:
        try:
            net.load_state_dict(load_state_dict(Path(a.init)), strict=True)
        except RuntimeError as e:
            raise RetinaInputError(f"--init {a.init}: weights do not fit a {a.variant} network ({str(e).splitlines()[0]})") from None

    info = {
        "variant": a.variant,
        "version": a.version or datetime.date.today().strftime(f"%Y.%m.%d-{a.variant}"),
        "data": data_names(a.data),
        "train_count": len(train_imgs),
        "validation_images": [r.image.name for r in val_recs],
        "reduction": a.reduction,
        # one factor stays a number, as in earlier model folders
        "val_reduction": a.val_reduction[0] if len(a.val_reduction) == 1 else a.val_reduction,
        "seed": a.seed,
        "samples_per_epoch": a.samples_per_epoch,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "ema_decay": a.ema,
        "grad_clip": a.grad_clip,
        "patience": a.patience,
        "parent": parent_record(parent_config),
        "parent_training": dict(parent_config.get("training", {}), version=parent_config.get("version")) if parent_config else None,
        "torch": torch.__version__,
        "command": portable_command("python -m training refiner", argv),
    }

    def loss_fn(logits, batch):
        return bce_dice_loss(logits, batch["target"])

    def config_of():
        return {"geometry": geom.to_dict(), "normalisation": NORM, "threshold": 0.5, "superpixels": False}

    trainer = Trainer(
        net, loss_fn, train_set, None, run_dir, **optimisation_kwargs(a),
        device=a.device, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs, minutes=a.minutes,
        num_workers=a.workers, seed=a.seed, val_fn=make_val_fn(val_images, config_of), monitor="val_iou", mode="max",
        lr_patience=max(1, a.patience // 2), early_stop_patience=a.patience,
        grad_clip=a.grad_clip or None, forward_fn=lambda m, b: m(b["image"], b["mask"]),
        on_epoch_end=[lambda tr, m: export_model(tr, m, out, info, geom) if m["is_best"] else None],
        info={k: info[k] for k in ("variant", "version", "data", "command")}, verbose=not a.quiet,
        budget=budget, log=log,
    )
    summary = trainer.fit(resume=a.resume)
    if is_main_process():
        if summary["best"] is None:
            say(f"no usable epoch; nothing written to {out}")
            return 0
        config = finish_model(out, info, val_images, trainer.device)
        sp = f", superpixel weighting {'on' if config and config['superpixels'] else 'off'}" if a.variant == "prototype" else ""
        say(f"model folder: {out} (best epoch {summary['best_epoch']}, image-level val IoU {summary['best']:.1f} %{sp}; "
            f"stopped by {summary['stopped']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._main import recipe_main

    return recipe_main("refiner", build_parser, _validate_args, run, argv)
