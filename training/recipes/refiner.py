"""python -m training refiner: train the coarse-ellipse refinement network.

    python -m training refiner --data DIR [DIR ...] --out MODEL_DIR
        [--variant prototype|baseline] [--device auto|cpu|cuda] [--epochs N | --minutes M] [--resume]

Coarse ellipses are simulated from the fine masks of every IDRiD-layout, flat or
annotation project folder given (paper 3.1), whole images are held out for
validation, and patches around the ellipses train the network with Dice + BCE,
Adam and ReduceLROnPlateau (paper 2 and 3.1). After every epoch that improves
the validation IoU the model folder (weights.safetensors, config.json, card.md)
is written to MODEL_DIR, so a stopped run always leaves a usable model. The
run's log (log.jsonl), checkpoints and split live in MODEL_DIR/run unless
--run-dir says otherwise; --resume continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from napari_retina import __version__
from napari_retina.io.errors import RetinaInputError

from ..data import (
    REFINER_LESIONS,
    DataError,
    RefinerPatches,
    gather_records,
    load_image,
    simulate_samples,
    split_by_image,
    write_split,
)

VAL_PER_LESION = 80  # validation patches per lesion: enough for a stable IoU, quick on a CPU
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    budget = p.add_argument_group("how long (at least one; with both, whichever ends first)")
    budget.add_argument("--epochs", type=int, help="total epochs (a resumed run continues the count)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget of this run")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="log, checkpoints and split (default MODEL_DIR/run)")
    p.add_argument("--init", metavar="MODEL_DIR", help="start from this model folder's weights (fine-tuning)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--train-superpixels", choices=("on", "off"), default="on",
                   help="prototype variant: train with the superpixel-guided weighting (paper 2.2; about 15%% slower "
                        "per step on a CPU) or without it; both forms are validated at export either way")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm (the prototype head's alpha = 20 makes early gradients spiky); 0: off")
    p.add_argument("--samples-per-epoch", type=int, default=2000, help="training patches per epoch")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels (multiple of 8)")
    p.add_argument("--reduction", type=float, nargs="+", default=[1.0],
                   help="reduction factors of the simulated ellipses (one set per factor)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images held out")
    p.add_argument("--val-images", nargs="+", metavar="NAME", help="hold out exactly these images instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--version", default=None, help="model version for config.json (default: a date stamp)")
    p.add_argument("--quiet", action="store_true")
    return p


def _validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.epochs is None and a.minutes is None:
        p.error("give --epochs N or --minutes M (or both)")
    if a.patch_size < 32 or a.patch_size % 8:
        p.error(f"--patch-size must be a multiple of 8 and at least 32, not {a.patch_size}")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, not {a.val_fraction}")
    if any(r < 1.0 for r in a.reduction):
        p.error("--reduction factors must be >= 1.0")
    if a.samples_per_epoch < 1:
        p.error("--samples-per-epoch must be at least 1")


def val_samples(samples, seed: int, per_lesion: int = VAL_PER_LESION):
    """A fixed, class-balanced subset of the validation ellipses (the same every epoch)."""
    rng = np.random.default_rng(seed)
    out = []
    for code in REFINER_LESIONS:
        group = [s for s in samples if s.ellipse.lesion == code]
        if len(group) > per_lesion:
            group = [group[i] for i in sorted(rng.choice(len(group), per_lesion, replace=False))]
        out.extend(group)
    return out


def patch_iou_table(model, val_set, device, thresholds=THRESHOLDS, superpixels: bool | None = None) -> dict:
    """Mean patch IoU (%) per lesion at each threshold, over `val_set` (inside the ellipse)."""
    import torch

    loader = torch.utils.data.DataLoader(val_set, batch_size=16, shuffle=False)
    t = torch.tensor(thresholds).view(1, -1, 1, 1)
    per = {c: [] for c in REFINER_LESIONS}
    for batch in loader:
        kw = {} if superpixels is None else {"superpixels": superpixels}
        prob = torch.sigmoid(model(batch["image"].to(device), batch["mask"].to(device), **kw)).float().cpu()
        inside = batch["mask"] > 0.5
        pred = (prob >= t) & inside  # (B, T, H, W)
        target = batch["target"] > 0.5
        i = (pred & target).sum((2, 3)).double()
        u = (pred | target).sum((2, 3)).double()
        iou = torch.where(u > 0, i / u.clamp_min(1), torch.ones_like(u))
        for k, code in enumerate(batch["lesion"]):
            per[code].append(iou[k])
    return {c: (torch.stack(v).mean(0) * 100).tolist() for c, v in per.items() if v}


def best_threshold(table: dict, thresholds=THRESHOLDS) -> dict:
    """The threshold with the best mean IoU over the lesions, and the figures there."""
    macro = np.mean([table[c] for c in table], axis=0)  # per threshold
    k = int(np.argmax(macro))
    out = {"iou": float(macro[k]), "threshold": float(thresholds[k])}
    out.update({f"iou_{c}": float(v[k]) for c, v in table.items()})
    return out


def make_val_fn(thresholds=THRESHOLDS):
    def val_fn(model, val_set, device) -> dict:
        return best_threshold(patch_iou_table(model, val_set, device, thresholds), thresholds)

    return val_fn


def superpixel_choice(trainer, val_set, metrics: dict) -> dict:
    """Validate the prototype net in its other form too (with/without superpixel weighting); ship the better.

    The epoch's validation used the form the net trains with; the weighting is a
    switch at inference, so both are measured on the same patches (paper 2.2).
    """
    import torch

    net = trainer.module
    trained_sp = bool(net.superpixels)
    was = net.training
    net.eval()
    with torch.no_grad():
        other = best_threshold(patch_iou_table(net, val_set, trainer.device, superpixels=not trained_sp))
    net.train(was)
    same = {"iou": metrics["val_iou"], "threshold": metrics["val_threshold"]}
    sp, plain = (same, other) if trained_sp else (other, same)
    chosen = sp if sp["iou"] > plain["iou"] else plain
    return {
        "superpixels": chosen is sp,
        "threshold": chosen["threshold"],
        "val_patch_iou_plain": round(float(plain["iou"]), 2),
        "val_patch_iou_superpixels": round(float(sp["iou"]), 2),
        "trained_with_superpixels": trained_sp,
    }


def render_card(info: dict, metrics: dict, summary: dict, choice: dict) -> str:
    val = info["validation_images"]
    figures = "\n".join(
        f"| {c} | {metrics.get(f'val_iou_{c}', float('nan')):.1f} |" for c in REFINER_LESIONS
    )
    return f"""# Ellipse refinement model ({info['variant']}) {info['version']}

Turns a coarse ellipse around a lesion (MA, SE, EX, HE) into a pixel mask:
{'a prototype network with superpixel-guided weighting' if info['variant'] == 'prototype' else 'the non-prototypical baseline (1x1 conv classifier)'}
on a truncated U-Net, trained by napari-retina {__version__}.

## Training

- Data: {', '.join(info['data'])} ({info['train_count']} training images, {len(val)} validation images)
- Coarse ellipses: simulated from the fine masks at reduction {', '.join(str(r) for r in info['reduction'])}, seed {info['seed']}
- Patches: {info['patch_size']}x{info['patch_size']}, {info['samples_per_epoch']} per epoch, batch {info['batch_size']}, Adam lr {info['lr']}, gradient norm clipped at {info['grad_clip'] or 'off'}
- Epochs: {summary['epochs']} (best epoch {summary['best_epoch']}), training time {summary['train_seconds'] / 60:.1f} min
- Device: {summary['device']} ({platform.machine()}, torch {info['torch']})
- Parent model: {info.get('init') or 'none (trained from scratch)'}
- Command: `{info['command']}`

## Validation (patch IoU %, inside the ellipse, threshold {metrics.get('val_threshold', 0.5):.2f})

| Lesion | IoU |
|---|---|
{figures}
| average | {metrics.get('val_iou', float('nan')):.1f} |

Trained {'with' if choice.get('trained_with_superpixels') else 'without'} the superpixel-guided weighting; at inference: {'on' if choice['superpixels'] else 'off'}{
    f" (validation patch IoU {choice['val_patch_iou_superpixels']:.1f} with it, {choice['val_patch_iou_plain']:.1f} without; threshold {choice['threshold']:.2f})"
    if 'val_patch_iou_superpixels' in choice else ''}.

Image-level figures: `napari-retina evaluate refine --data DIR --model THIS_FOLDER --split val`.

Validation images (held out by image): {', '.join(val)}

## Checksum

weights.safetensors SHA-256: {{sha256}}
"""


def export_model(trainer, metrics: dict, out: Path, info: dict, geom, val_set) -> None:
    """Write the model folder from the trainer's current weights (called on each best epoch)."""
    from napari_retina.models.folder import write_model_folder

    if info["variant"] == "prototype":
        choice = superpixel_choice(trainer, val_set, metrics)
    else:
        choice = {"superpixels": False, "threshold": metrics.get("val_threshold", 0.5)}

    net = trainer.module
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    summary = {
        "epochs": metrics["epoch"],
        "best_epoch": metrics["epoch"],
        "train_seconds": trainer._train_seconds_before + trainer._seconds(),
        "device": str(trainer.device),
    }
    config = {
        "model": "refiner",
        "version": info["version"],
        "net": net.config(),
        "geometry": geom.to_dict(),
        "normalisation": {"mean": 127.5, "scale": 63.75, "channels": "RGB"},
        "threshold": round(float(choice["threshold"]), 3),
        "superpixels": bool(choice["superpixels"]),
        "lesions": list(REFINER_LESIONS),
        "validation_images": info["validation_images"],
        "training": {
            "epochs": summary["epochs"],
            "minutes": round(summary["train_seconds"] / 60, 1),
            "device": summary["device"],
            "val_patch_iou": round(float(metrics.get("val_iou", float("nan"))), 2),
            **{k: v for k, v in choice.items() if k.startswith(("val_", "trained_"))},
            "command": info["command"],
            "parent": info.get("init"),
            "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    write_model_folder(out, state, config, render_card(info, metrics, summary, choice))


def run(a: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from napari_retina.models.folder import load_state_dict
    from napari_retina.models.patches import PatchGeometry
    from napari_retina.nets.refiner import RefinerNet
    from training.losses import bce_dice_loss
    from training.trainer import Trainer, is_main_process

    out = Path(a.out)
    run_dir = Path(a.run_dir) if a.run_dir else out / "run"
    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))

    records = gather_records(a.data)
    split_file = run_dir / "split.json"
    val_names = a.val_images
    if a.resume and split_file.is_file() and not val_names:
        val_names = json.loads(split_file.read_text())["val"]  # a resumed run keeps its split
    train_recs, val_recs = split_by_image(records, a.val_fraction, a.seed, val_names)
    if not val_recs:
        raise DataError("no validation image: give at least two images")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_split(split_file, train_recs, val_recs)

    t0 = time.monotonic()
    train_imgs = [load_image(r) for r in train_recs]
    val_imgs = [load_image(r) for r in val_recs]
    train_samples = [s for red in a.reduction for s in simulate_samples(train_imgs, red, a.seed)]
    val_all = simulate_samples(val_imgs, a.reduction[0], a.seed)
    if not train_samples:
        raise DataError("no lesions (MA, SE, EX, HE) in the training images' masks")
    if not val_all:
        raise DataError("no lesions in the validation images' masks")
    counts = {c: sum(s.ellipse.lesion == c for s in train_samples) for c in REFINER_LESIONS}
    say(f"{len(train_imgs)} training images ({', '.join(f'{c} {n}' for c, n in counts.items())} ellipses), "
        f"{len(val_imgs)} validation images; loaded in {time.monotonic() - t0:.0f} s")

    geom = PatchGeometry(size=a.patch_size)
    train_set = RefinerPatches(train_imgs, train_samples, geom, augment=True, seed=a.seed, length=a.samples_per_epoch)
    val_set = RefinerPatches(val_imgs, val_samples(val_all, a.seed), geom, augment=False)

    net = RefinerNet(
        base_channels=a.base_channels, variant=a.variant,
        superpixels=a.variant == "prototype" and a.train_superpixels == "on",
    )
    if a.init:
        try:
            net.load_state_dict(load_state_dict(Path(a.init)), strict=True)
        except RuntimeError as e:
            raise RetinaInputError(f"--init {a.init}: weights do not fit a {a.variant} network ({str(e).splitlines()[0]})") from None

    info = {
        "variant": a.variant,
        "version": a.version or datetime.date.today().strftime(f"%Y.%m.%d-{a.variant}"),
        "data": [str(Path(d)) for d in a.data],
        "train_count": len(train_imgs),
        "validation_images": [r.image.name for r in val_recs],
        "reduction": a.reduction,
        "seed": a.seed,
        "patch_size": a.patch_size,
        "samples_per_epoch": a.samples_per_epoch,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "grad_clip": a.grad_clip,
        "init": a.init,
        "torch": torch.__version__,
        "command": "python -m training refiner " + shlex.join(argv),
    }

    def loss_fn(logits, batch):
        return bce_dice_loss(logits, batch["target"])

    trainer = Trainer(
        net, loss_fn, train_set, val_set, run_dir,
        device=a.device, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs, minutes=a.minutes,
        num_workers=a.workers, seed=a.seed, val_fn=make_val_fn(), monitor="val_iou", mode="max",
        lr_patience=4, grad_clip=a.grad_clip or None, forward_fn=lambda m, b: m(b["image"], b["mask"]),
        on_epoch_end=[lambda tr, m: export_model(tr, m, out, info, geom, val_set) if m["is_best"] else None],
        info={k: info[k] for k in ("variant", "version", "data", "command")}, verbose=not a.quiet,
    )
    summary = trainer.fit(resume=a.resume)
    if is_main_process():
        say(f"model folder: {out} (best epoch {summary['best_epoch']}, val IoU {summary['best']:.1f} %)"
            if summary["best"] is not None else f"no usable epoch; nothing written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a = p.parse_args(argv)
    _validate_args(p, a)
    try:
        return run(a, argv)
    except (RetinaInputError, DataError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"training refiner: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("training refiner: interrupted; resume with --resume", file=sys.stderr)
        return 130
