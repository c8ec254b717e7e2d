"""The command-line wrapper every recipe shares: parse, check, run, one-line errors (exit 2)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable

from napari_retina.io.errors import RetinaInputError

from ..data import DataError


def add_run_args(
    p, *, init: str, batch_size: int, lr: float, samples: int, samples_help: str, patience: int, patience_help: str,
    lr_help: str = "Adam learning rate (default %(default)s)", batch_help: str | None = None, workers: bool = True,
) -> None:
    """The options every trainable recipe shares (device, budget, resuming, split, seed, version),
    after the recipe's own; the defaults and help that differ between recipes are arguments."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    budget = p.add_argument_group("how long (at least one; with both, whichever ends first)")
    budget.add_argument("--epochs", type=int, help="total epochs (a resumed run continues the count)")
    budget.add_argument("--minutes", type=float,
                        help="wall-clock budget of this whole run: loading the data and the last validation included")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="log, checkpoints and split (default MODEL_DIR/run)")
    p.add_argument("--init", metavar="MODEL_DIR", help=init)
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--samples-per-epoch", type=int, default=samples, help=samples_help)
    p.add_argument("--patience", type=int, default=patience, help=patience_help)
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images held out (default %(default)s)")
    p.add_argument("--val-images", nargs="+", metavar="NAME", help="hold out exactly these images instead")
    p.add_argument("--seed", type=int, default=0)
    if workers:
        p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--version", default=None, help="model version for config.json (default: a date stamp)")
    p.add_argument("--quiet", action="store_true")


def add_optimisation_args(p) -> None:
    """The optimiser and learning-rate schedule: options of every trainable recipe, not fixed in the trainer."""
    from ..trainer import OPTIMIZERS, SCHEDULERS

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="(default %(default)s)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="plateau",
                   help="plateau: halve the rate when validation stalls; cosine: anneal over --epochs (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="(default %(default)s)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate and export an exponential moving average of the weights with this decay per "
                        "step (e.g. 0.99: about the last 100 steps); steadies validation at small batches")
    g.add_argument("--no-amp", action="store_true",
                   help="train in float32 even where the device computes bfloat16 natively (a recent GPU, or a CPU "
                        "with AVX512-BF16 or AMX, where mixed precision trains about twice as fast)")


def optimisation_kwargs(a) -> dict:
    """What `add_optimisation_args` parsed, as Trainer keyword arguments."""
    return {"optimizer": a.optimizer, "scheduler": a.scheduler, "weight_decay": a.weight_decay,
            "ema_decay": getattr(a, "ema", None), "amp": not getattr(a, "no_amp", False)}


def ema_text(decay) -> str:
    """The card's words for `--ema` (empty without it), to follow the learning rate."""
    return (f",\n  the weights averaged over steps (EMA, decay {decay}): the averaged weights are validated and shipped"
            if decay else "")


def precision(trainer) -> str:
    """The arithmetic a run trained in, for config.json and the card."""
    return f"{str(trainer.amp['dtype']).replace('torch.', '')} mixed precision" if trainer.amp["enabled"] else "float32"


def say_end(say: Callable, summary: dict, out, figure: str) -> None:
    """The run's last line, in the main process: its model folder and best `figure` (e.g. "val
    AUPR {:.3f} at the working scale"), or that no epoch was usable."""
    from ..trainer import is_main_process

    if not is_main_process():
        return
    if summary["best"] is None:
        say(f"no usable epoch; nothing written to {out}")
    else:
        say(f"model folder: {out} (best epoch {summary['best_epoch']}, {figure.format(summary['best'])}; "
            f"stopped by {summary['stopped']})")


# What a card and config.json record of the paths a run was given: a model folder travels to
# other machines, and a folder's name on the training machine can be a patient's or a user's.
PATH_RULE = ("paths as given when relative to the folder the command ran in; any other path (absolute, "
             "under ~, or reaching out with ..) by its last component")


def portable_path(value) -> str:
    """`value` as a card shows it (`PATH_RULE`): a relative path inside the working folder as given,
    any other path by its last component (``/data/idrid-train`` -> ``idrid-train``)."""
    from pathlib import PurePosixPath, PureWindowsPath

    s = str(value)
    posix, win = PurePosixPath(s), PureWindowsPath(s)
    if not (s.startswith("~") or posix.is_absolute() or win.is_absolute() or ".." in posix.parts or ".." in win.parts):
        return s
    name = win.name if win.is_absolute() else posix.name
    return name if name and name != ".." else "DIR"


def portable_command(prefix: str, argv) -> str:
    """The command line a card records: `prefix` and `argv` with every path made portable."""
    import shlex

    out = []
    for tok in argv:
        tok = str(tok)
        if tok.startswith("--") and "=" in tok:
            flag, _, value = tok.partition("=")
            out.append(f"{flag}={portable_path(value)}")
        elif tok.startswith("-"):
            out.append(tok)
        else:
            out.append(portable_path(tok))
    return f"{prefix} {shlex.join(out)}".rstrip()


def data_names(folders) -> list[str]:
    """The data folders as a card names them: the portable name, and for an IDRiD-layout folder
    the split folders it holds (e.g. ``idrid-train (IDRiD layout: a. Training Set)``)."""
    from pathlib import Path

    from napari_retina.io.datasets import IDRID_IMAGES, IDRID_SPLITS

    out = []
    for d in folders:
        splits = [s for s in IDRID_SPLITS if (Path(d) / IDRID_IMAGES / s).is_dir()]
        out.append(portable_path(d) + (f" (IDRiD layout: {', '.join(splits)})" if splits else ""))
    return out


def portable_record(obj, key: str | None = None):
    """A copy of a JSON-like record (e.g. an older part's `training`) with its paths made portable:
    a "command" token by token, any other string that is a path outside the working folder by its
    last component, a "folder" entry left out."""
    import shlex

    if isinstance(obj, dict):
        return {k: portable_record(v, k) for k, v in obj.items() if k != "folder"}
    if isinstance(obj, list):
        return [portable_record(v) for v in obj]
    if isinstance(obj, str):
        if key == "command":
            try:
                words = shlex.split(obj)
            except ValueError:
                return obj
            n = 4 if words[:2] == ["python", "-m"] else 1  # "python -m training NAME"
            return portable_command(shlex.join(words[:n]), words[n:])
        return portable_path(obj) if ("/" in obj or "\\" in obj) and not obj.startswith(("http://", "https://")) else obj
    return obj


def parent_record(config: dict | None) -> dict | None:
    """The parent model as config.json records it: kind, version and weights checksum (never its folder)."""
    if not config:
        return None
    return {"model": config.get("model"), "version": config.get("version"), "weights_sha256": config.get("weights_sha256")}


def parent_text(parent) -> str:
    """The card's words for a recorded parent (`parent_record`; an older config's string as it is)."""
    if not parent:
        return "none (trained from scratch)"
    if isinstance(parent, dict):
        sha = parent.get("weights_sha256")
        return f"{parent.get('model', 'model')} {parent.get('version', '?')}" + (f" (weights SHA-256 {sha})" if sha else "")
    return str(parent)


# when `python -m training` started (time.monotonic), set by training.__main__ before it imports a
# recipe: a run's --minutes budget counts from there (imports and data preparation included)
RUN_STARTED: float | None = None



def advice(lesions: str) -> str:
    """What to do about too little labelled data, in a line's end."""
    return (f"annotate {lesions} on another image and tick *reviewed* there, or add an IDRiD-layout folder as extra "
            "data (the Retrain dock's \"and\" field, or a second folder after --data)")


def too_little_data(lesions: str, labelled: list[str]) -> DataError:
    """The one-line error for too few labelled images, with what to do about it."""
    have = (f"only {labelled[0]} has a label for {lesions}" if len(labelled) == 1 else
            f"no image has a label for {lesions}" if not labelled else f"only {len(labelled)} images have a label for {lesions}")
    return DataError(f"{have}, and training holds whole images out for validation, so it needs at least two: {advice(lesions)}")


class Preparation:
    """The run log's "prepare" events while a recipe loads its data (`open_run_log`): how many
    of how many, the seconds since the run started and about how many are still to come, so
    progress shows from the start even when loading takes minutes."""

    def __init__(self, log, budget, total: int, what: str = "loading images"):
        self.log, self.budget, self.total, self.what = log, budget, max(1, int(total)), what
        self.t0 = time.monotonic()

    def __call__(self, done: int) -> None:
        if self.log is None:
            return
        per = (time.monotonic() - self.t0) / max(done, 1)
        self.log.write("prepare", what=self.what, done=done, total=self.total,
                       elapsed=round(self.budget.elapsed(), 1), eta=round(per * max(0, self.total - done), 1))


DESCRIBE = "--describe-options"  # `python -m training <model> --describe-options`: the options as JSON


def describe_options(parser) -> list[dict]:
    """Every option of a recipe's parser as JSON-ready data: the one declaration from which the
    command line and the Retrain dock's form are both built (the dock runs this as a subprocess:
    napari_retina never imports training)."""
    out = []
    for act in parser._actions:  # argparse keeps no public list of its actions
        if not act.option_strings or act.dest in ("help",):
            continue
        if act.nargs == 0:
            kind = "flag"
        elif act.choices:
            kind = "choice"
        elif act.nargs in ("+", "*") or isinstance(act.nargs, int):
            kind = "list"
        elif act.type is int:
            kind = "int"
        elif act.type is float:
            kind = "float"
        else:
            kind = "str"
        default = act.default if isinstance(act.default, (int, float, str, bool, list, type(None))) else str(act.default)
        out.append({"flag": act.option_strings[-1], "dest": act.dest, "kind": kind, "default": default,
                    "choices": list(act.choices) if act.choices else None, "required": bool(act.required),
                    "help": (act.help or "").replace("%(default)s", str(act.default))})
    return out


def recipe_main(name: str, build_parser: Callable, validate: Callable, run: Callable, argv: list[str] | None) -> int:
    """`python -m training <name> ...`: prints the resolved options first; a user's mistake prints one
    line and exits with code 2."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()

    def one_line(message: str):  # argparse's own error prints the whole usage first; exit code 2 as argparse's
        print(f"{p.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    p.error = one_line
    if argv == [DESCRIBE]:
        print(json.dumps(describe_options(p)))
        return 0
    global RUN_STARTED
    started, RUN_STARTED = (RUN_STARTED if RUN_STARTED is not None else time.monotonic()), None
    a = p.parse_args(argv)
    validate(p, a)
    if getattr(a, "scheduler", None) == "cosine" and getattr(a, "epochs", 0) is None:
        p.error("--scheduler cosine needs --epochs")
    if not getattr(a, "quiet", False):
        print(f"training {name}: " + json.dumps({k: v for k, v in vars(a).items()}, default=str), flush=True)
    if hasattr(a, "minutes"):  # the whole run's budget, from the process's start (training.trainer.RunBudget)
        from ..trainer import RunBudget

        a.budget = RunBudget(a.minutes, started=started)
    lock = None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # SIGTERM (the dock's Cancel) while the data is prepared: stop there, as Ctrl-C does; the
        # trainer stops at a step's end instead once it runs
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        lock = run_lock(a)
        return run(a, argv)
    except (RetinaInputError, DataError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"training {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = lock is not None and not lock._kept_nothing()
        print(f"training {name}: interrupted; " + ("resume with --resume" if kept else "nothing was kept"), file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _RunLock:
    """A FileLock on the run folder that knows which folders it made, so that releasing it takes
    them away again if the run wrote nothing into them."""

    def __init__(self, path: str, created: list, out=None):
        from filelock import FileLock

        self._lock, self._path, self._created, self._out = FileLock(path), path, created, out

    def acquire(self, timeout: float) -> None:
        self._lock.acquire(timeout=timeout)

    def _kept_nothing(self) -> bool:
        """Whether the run left neither a model (config.json) nor a checkpoint to resume from."""
        from pathlib import Path

        run_dir = Path(self._path).parent
        model = self._out is not None and (Path(self._out) / "config.json").is_file()
        return not model and not any((run_dir / "checkpoints").glob("*.pt"))

    def release(self) -> None:
        import os
        import shutil

        created = self._created
        try:  # decided while the lock is still held, so no other run can have started here
            if created and self._kept_nothing():
                # a failed run, or one cancelled before its first checkpoint: no empty version folder
                # (what it wrote is its log and split, which describe nothing that exists)
                shutil.rmtree(created[-1], ignore_errors=True)
                created = []
            elif not created or {q.name for q in created[0].iterdir()} != {".lock"}:
                created = []
            else:
                os.remove(self._path)
        except OSError:
            created = []
        self._lock.release()
        for d in created:  # deepest first; rmdir takes only empty folders
            try:
                os.rmdir(d)
            except OSError:
                break


def run_lock(a):
    """Hold the run folder for this process: a second training into the same folder (one still
    finishing its epoch after a Ctrl-C, or the same command twice) would interleave checkpoints,
    log and model folder, so it stops with one line instead. An OS file lock (filelock, which
    torch itself requires) goes with the process, so a killed run leaves nothing to clean up.
    Only the main process of a torchrun holds it; recipes without a run folder take none.
    A run that stops before writing anything (bad data, a typo in --out) leaves no folder behind."""
    from pathlib import Path

    from filelock import Timeout

    from ..trainer import is_main_process

    if not hasattr(a, "run_dir") or getattr(a, "out", None) is None or not is_main_process():
        return None
    run_dir = Path(a.run_dir) if a.run_dir else Path(a.out) / "run"
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _RunLock(str(run_dir / ".lock"), created, out=a.out)
    try:
        lock.acquire(timeout=0)
    except Timeout:  # the folder is another run's: leave it as it is
        raise RetinaInputError(
            f"{a.out} is being trained by another process (it holds {run_dir / '.lock'}); "
            "wait for it to end or give another --out") from None
    return lock
