"""The one trainer every model recipe reuses: device, seeds, AMP, DDP, checkpoints, resume, log.

Like nnU-Net, every training concern lives here and a recipe only says what to
train: a model, a loss `loss_fn(outputs, batch)`, datasets of dicts of tensors,
and optionally how to validate and what to export at the end of an epoch.

Output folder (`out_dir`):

    log.jsonl              one JSON object a line, flushed at once, so the train
                           widget (or `tail -f`) can follow: "start", "step",
                           "epoch", "end" (or "error") events
    checkpoints/last.pt    everything needed to resume, written atomically every epoch
    checkpoints/best.pt    the same for the epoch with the best monitored metric

Weight averaging (`ema_decay`): an exponential moving average of the weights (torch's
AveragedModel) is updated after every optimiser step; validation, best.pt's choice and the
recipes' exports (`Trainer.eval_module`) use the averaged weights, training goes on with the
raw ones (both are in the checkpoints). It steadies a model whose validation swings from epoch
to epoch at small batches.

Time budget (`minutes`): a `RunBudget` bounds the whole run, not only the training loop. It
starts when the run starts (the recipe's data preparation counts), and the loop stops as soon as
one more step and the run's closing (the last validation, the checkpoints and the export, timed
on the epochs before or estimated by the recipe beforehand) would no longer end within it. Its
clock is injectable, so the stop rule is tested without sleeping. Every "step" and "epoch" event
carries the seconds elapsed since the run started and an estimate of those still to come
(`eta`); the first step is logged at once, later ones every `log_every_steps` steps or
`log_every_seconds` seconds, whichever comes first.

Multi-GPU: `torchrun --nproc_per_node=N -m training <model> ...` sets WORLD_SIZE,
RANK and LOCAL_RANK; the Trainer then joins the process group (NCCL on CUDA,
Gloo on CPU), wraps the model in DistributedDataParallel, shards the training
data with a DistributedSampler, and only rank 0 validates, logs, saves and runs
the epoch hooks. `batch_size` is per process.

Imports only torch, NumPy and napari_retina's headless core, so it runs where napari and Qt are not installed.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from napari_retina.io.atomic import atomic_write
from napari_retina.io.errors import RetinaInputError
from napari_retina.models.precision import bf16_native  # one probe for training and inference

__all__ = [
    "TrainingError",
    "select_device",
    "seed_everything",
    "amp_policy",
    "amp_settings",
    "world_size",
    "rank",
    "is_main_process",
    "unwrap",
    "count_parameters",
    "save_checkpoint",
    "load_checkpoint",
    "RunBudget",
    "open_run_log",
    "Trainer",
]

CHECKPOINT_FORMAT = 1
# in DDP the ranks agree on stopping (time budget, cancel) by an all-reduce; doing it
# every step would stall the GPU pipeline on a host sync, so only every few steps
DDP_STOP_CHECK_EVERY = 10
# long enough for rank 0 to validate and export while the other ranks wait
DDP_TIMEOUT = datetime.timedelta(minutes=30)


class TrainingError(RetinaInputError):
    """A training problem the user can fix (bad device, nothing to resume...); one-line message.

    A ValueError (through RetinaInputError), so the CLI prints it and exits with code 2.
    """


# ---- device ----------------------------------------------------------------------------------------


def select_device(spec: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or "mps" -> a torch.device."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise TrainingError("device 'mps': Apple MPS is not available on this machine")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = None
        if text != "cuda":
            suffix = text[len("cuda:"):]
            if not suffix.isdigit():
                raise TrainingError(f"device {spec!r}: expected cuda:N with N a GPU number")
            index = int(suffix)
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise TrainingError(f"device {spec!r}: no CUDA GPU is available (torch {torch.__version__}, {build})")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise TrainingError(f"device {spec!r}: this machine has {count} GPU(s), numbered 0 to {count - 1}")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    raise TrainingError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


# ---- seeds and random states -------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU).

    With `deterministic`, cuDNN picks deterministic kernels and does no autotuning
    (benchmark off); otherwise it autotunes, which is faster for fixed patch sizes.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device, lazily
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def _derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each DataLoader worker differently, but forked workers share NumPy's and
    # Python's global state: derive those from torch's per-worker seed
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict:
    """The global random states, in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    # never initialise CUDA just to read its state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA states only where the GPU count matches)."""
    random.setstate(_as_tuples(state["python"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(x):
    # random.setstate needs tuples; a round trip through some loaders gives lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- mixed precision ---------------------------------------------------------------------------------


def amp_policy(device_type: str, bf16_supported: bool, enabled: bool = True) -> dict:
    """Which autocast dtype and whether a GradScaler is needed; a pure function, testable without a GPU.

    CUDA: bfloat16 where the GPU does it natively (same range as float32, so no loss
    scaling), else float16 with a GradScaler (its small range underflows gradients).
    CPU: bfloat16 where the processor computes it natively (AVX512-BF16 or AMX): oneDNN's
    convolutions then train about twice as fast (U-Net, batch 8 of 256 px, one core: 3.1 ->
    1.6 s a step; UNet++ 8.3 -> 4.4 s); elsewhere float32 (emulated bfloat16 is slower).
    """
    if enabled and device_type == "cuda":
        if bf16_supported:
            return {"enabled": True, "dtype": torch.bfloat16, "use_scaler": False}
        return {"enabled": True, "dtype": torch.float16, "use_scaler": True}
    if enabled and device_type == "cpu" and bf16_supported:
        return {"enabled": True, "dtype": torch.bfloat16, "use_scaler": False}
    return {"enabled": False, "dtype": None, "use_scaler": False}


def amp_settings(
    device: torch.device | str, enabled: bool = True, bf16_supported: bool | None = None
) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler]:
    """(autocast context factory, GradScaler) for `device`, following `amp_policy`.

    `bf16_supported=None` asks the device; pass a value to decide without touching CUDA.
    The scaler is disabled (a no-op passthrough) unless float16 is used.
    """
    device = torch.device(device)
    if bf16_supported is None:
        bf16_supported = bf16_native(device)
    policy = amp_policy(device.type, bf16_supported, enabled)
    if policy["enabled"]:
        factory = functools.partial(torch.autocast, device_type=device.type, dtype=policy["dtype"])
    else:
        factory = contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=policy["use_scaler"])
    return factory, scaler


# ---- distributed ---------------------------------------------------------------------------------------


def world_size() -> int:
    """Number of processes: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not distributed); works before the group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True in the process that logs and saves (rank 0, or the only process)."""
    return rank() == 0


def _init_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Join torchrun's process group; returns this rank's device and whether we created the group."""
    if not torch.distributed.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        # one GPU per process: torchrun's LOCAL_RANK picks it
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=DDP_TIMEOUT)
    return device, True


_exits = 0  # fits ended in this process (all ranks run the same fits, so the same count)


def _leave_together() -> None:
    """Return only once every rank has got here (through the group's key-value store, not Gloo).

    Gloo can fail a rank that is still finishing a barrier when a peer that finished it first
    tears its connections down (pytorch/gloo#155, "Barrier followed by context destruction
    causes some participants to fail"; seen here, rarely, as a SIGABRT of one of two CPU
    ranks). Counting the ranks in the store once each has left the barrier means
    no rank closes a connection while another still waits on it. torch.distributed has no
    public call for the default group's store; where that private one is missing, this is
    skipped and the barrier alone remains.
    """
    global _exits
    get_store = getattr(torch.distributed.distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return
    _exits += 1
    store, key = get_store(), f"napari-retina/left-barrier/{_exits}"
    if store.add(key, 1) == torch.distributed.get_world_size():
        store.set(key + "/all", "1")
    store.wait([key + "/all"])


# ---- models and checkpoints -------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad or not trainable_only)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """torch.save `state` atomically (temporary file + os.replace): a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = False,
) -> dict:
    """Read a checkpoint written by the Trainer and load whichever parts are given.

    The model may be wrapped (DDP, compile): weights go into the plain module.
    Returns the whole checkpoint dict (epoch, step, best, metrics, info...).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        # weights_only: a checkpoint is data, never code to run
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise TrainingError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise TrainingError(f"{path}: not a napari-retina training checkpoint")
    if model is not None:
        try:
            unwrap(model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise TrainingError(f"{path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    # a disabled scaler saves {}; loading {} into an enabled one would raise
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return ckpt


# ---- batches and the log --------------------------------------------------------------------------------


def _has_strided_pointwise_conv(model: nn.Module) -> bool:
    """Whether `model` has a 1x1 convolution with a stride (a residual network's downsampling
    shortcut). torch 2.13's CPU backward of one in channels-last memory writes out of bounds (a
    segfault or "free(): invalid next size" with 3 or 8 input channels), so such models train
    in the default layout; their inference (forward only) is unaffected."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) for m in model.modules())


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) dict/list/tuple batch to `device`; other values stay.
    `channels_last`: image-shaped (4-D) tensors also go to that memory layout."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def _float32(x: Any) -> Any:
    """Lower-precision floating tensors of a (nested) model output as float32; the rest as it is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


def batch_len(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = batch_len(v)
        if n:
            return n
    return 0


def default_forward(model: nn.Module, batch: dict) -> Any:
    """The model sees the batch's "image"; recipes with other inputs pass their own forward_fn."""
    return model(batch["image"])


def _jsonable(x: Any) -> Any:
    """Plain JSON: tensors/NumPy scalars become numbers, NaN and infinities become null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    return str(x)


class JsonLog:
    """Append-only JSON-lines log, one flushed line per event, so readers never wait."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict:
        record = _jsonable({"event": event, "time": round(time.time(), 3), **fields})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()


# ---- the time budget of a whole run -------------------------------------------------------------------------


class RunBudget:
    """The wall-clock budget of one run (`--minutes`): data preparation, training and the closing
    (the last validation, checkpoints and export) all count.

    Pure bookkeeping on `clock` (injectable: the stop rule is tested without sleeping). `started`
    is when the run began on that clock (default: now). The trainer notes how long each step and
    each closing took; `must_stop()` says whether one more step plus the closing would still end
    by the deadline. Before the first closing has been timed, the recipe's estimate
    (`expect_closing`) stands for it, else `DEFAULT_CLOSING` of the budget. A closing is timed
    against the steps of its moment: when the steps later run slower (other processes on the
    same cores), the closing is expected to slow down as much.
    """

    DEFAULT_CLOSING = 0.1  # of the budget: the closing's share assumed while nothing better is known
    SAFETY = 1.15  # a closing may take a little longer than the last one did (other processes, export)

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        if minutes is not None and not minutes > 0:
            raise TrainingError(f"minutes must be positive, not {minutes}")
        self.clock = clock
        self.seconds = None if minutes is None else 60.0 * float(minutes)
        self.started = clock() if started is None else float(started)
        self.finish_factor = 1.0  # the run's very end costs this many closings (recipes with extra end work: more)
        self._steps: list[float] = []
        self._closing: float | None = None  # measured
        self._expected: float | None = None  # the recipe's estimate, before anything was measured
        self._closing_ref: float | None = None  # the mean step of the closing's moment
        self._expected_ref: list[float] = []  # the first steps after the estimate: its moment's pace

    @property
    def deadline(self) -> float | None:
        return None if self.seconds is None else self.started + self.seconds

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float | None:
        return None if self.seconds is None else self.deadline - self.clock()

    def note_step(self, seconds: float) -> None:
        self._steps = (self._steps + [max(0.0, float(seconds))])[-8:]
        if self._expected is not None and len(self._expected_ref) < 3:
            self._expected_ref.append(max(0.0, float(seconds)))

    def note_closing(self, seconds: float) -> None:
        self._closing = max(0.0, float(seconds))
        self._closing_ref = self.mean_step_seconds

    def expect_closing(self, seconds: float) -> None:
        """The recipe's estimate of one closing (e.g. one validation timed on a tile), until one is measured."""
        self._expected = max(0.0, float(seconds))
        self._expected_ref = []

    def _slowdown(self, ref: float | None) -> float:
        """How much slower the steps run now than at `ref` (never below 1: never less careful)."""
        now = self.mean_step_seconds
        return 1.0 if not ref or now is None else max(1.0, now / ref)

    @property
    def step_seconds(self) -> float:
        """What one more step is expected to take: the slowest of the last few (0 before the first)."""
        return max(self._steps, default=0.0)

    @property
    def mean_step_seconds(self) -> float | None:
        return sum(self._steps) / len(self._steps) if self._steps else None

    @property
    def closing_seconds(self) -> float:
        """What one closing is expected to take (validation, checkpoints, export)."""
        if self._closing is not None:
            return self._closing * self.SAFETY * self._slowdown(self._closing_ref)
        if self._expected is not None:
            ref = sum(self._expected_ref) / len(self._expected_ref) if self._expected_ref else None
            return self._expected * self.SAFETY * self._slowdown(ref)
        return 0.0 if self.seconds is None else self.DEFAULT_CLOSING * self.seconds

    @property
    def final_closing_seconds(self) -> float:
        return self.closing_seconds * self.finish_factor

    def must_stop(self) -> bool:
        """True when one more step and the run's closing would not both end by the deadline."""
        if self.seconds is None:
            return False
        return self.clock() + self.step_seconds + self.final_closing_seconds >= self.deadline

    def eta(self, steps_left: int | None = None, closings_left: int = 1) -> float | None:
        """Seconds still to come: the smaller of what `steps_left` steps and `closings_left`
        closings take (None: not known) and what the budget leaves."""
        guesses = []
        if steps_left is not None and self.mean_step_seconds is not None:
            closings = (closings_left - 1) * self.closing_seconds + self.final_closing_seconds if closings_left else 0.0
            guesses.append(steps_left * self.mean_step_seconds + closings)
        if self.seconds is not None:
            guesses.append(max(0.0, self.left()))
        return round(max(0.0, min(guesses)), 1) if guesses else None


def open_run_log(run_dir: str | os.PathLike, resume: bool = False) -> JsonLog | None:
    """The run's log, opened before its data is prepared (fresh unless `resume`), so the
    preparation's "prepare" events come first; hand it to the Trainer (`log=`), which goes on
    writing it. None outside the main process (one process speaks)."""
    if not is_main_process():
        return None
    try:
        return JsonLog(Path(run_dir) / "log.jsonl", append=resume)
    except OSError as e:
        raise TrainingError(f"cannot write the log in {run_dir}: {e.strerror or e}") from None


# ---- the trainer -------------------------------------------------------------------------------------------

EpochHook = Callable[["Trainer", dict], None]


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("plateau", "cosine", "none")


class Trainer:
    """Trains `model` (Adam, AdamW or SGD; ReduceLROnPlateau, cosine or a constant rate: `optimizer`,
    `scheduler`); see the module docstring for what it writes.

    `loss_fn(outputs, batch) -> scalar tensor`, with `outputs = forward_fn(model, batch)`
    (default `model(batch["image"])`). `val_fn(model, val_set, device) -> {name: value}`
    is called under no_grad with the plain (unwrapped) model (the averaged one with `ema_decay`)
    in eval mode, outside the training autocast (a `val_fn` that runs the network as the plugin
    does, e.g. the PRN's PatchScorer, computes in the plugin's inference precision);
    its names are logged with a "val_" prefix (added if missing). Without `val_fn`, the
    validation metric is the mean `loss_fn` over `val_set` ("val_loss"). `monitor` names
    the logged metric that drives the LR schedule and best.pt ("train_loss" works too).

    `early_stop_patience`: stop ("early") once the monitored metric has not improved for
    that many epochs (the checkpoints keep the best epoch).

    `epochs` is the total target (a resumed run continues the count); `minutes` is a
    wall-clock budget: `budget` (a RunBudget the recipe started when the run began, so that
    its data preparation counts), else one started when `fit` is called. Training stops
    where one more step and the closing (validation, checkpoints, export) would end past
    it; the epoch ends there (logged "partial": true, counted as done), is validated and
    saved. At least one of the two must be given. SIGTERM/SIGINT (the widget's cancel) and
    `request_stop()` stop the same way. `log`: the run's log as `open_run_log` opened it
    for the preparation's events (default: the trainer opens `out_dir/log.jsonl`).

    `on_epoch_end` hooks run in the main process after the checkpoints are written,
    as `hook(trainer, metrics)`; `metrics["is_best"]` says whether best.pt was updated.
    `on_epoch_end_every_rank` hooks run before them in every process (under torchrun), for
    what each process trains on next (a sampler's weights): DDP keeps the weights equal, so
    a deterministic hook gives every process the same result (up to batch-norm statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, dict], torch.Tensor],
        train_set: Dataset,
        val_set: Dataset | None,
        out_dir: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        lr: float = 1e-3,
        epochs: int | None = None,
        optimizer: str = "adam",
        scheduler: str = "plateau",
        minutes: float | None = None,
        num_workers: int = 0,
        seed: int = 0,
        amp: bool = True,
        val_fn: Callable[[nn.Module, Dataset | None, torch.device], dict] | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        lr_patience: int = 5,
        early_stop_patience: int | None = None,
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        log_every_steps: int = 50,
        log_every_seconds: float = 5.0,
        budget: RunBudget | None = None,
        log: JsonLog | None = None,
        forward_fn: Callable[[nn.Module, dict], Any] | None = None,
        on_epoch_end: Iterable[EpochHook] = (),
        on_epoch_end_every_rank: Iterable[EpochHook] = (),
        deterministic: bool = False,
        find_unused_parameters: bool = False,
        ema_decay: float | None = None,
        info: dict | None = None,
        verbose: bool = True,
    ):
        if budget is not None and minutes is None:
            minutes = None if budget.seconds is None else budget.seconds / 60.0
        if epochs is None and minutes is None:
            raise TrainingError("give a number of epochs, a time budget in minutes, or both")
        if epochs is not None and epochs < 1:
            raise TrainingError(f"epochs must be at least 1, not {epochs}")
        if minutes is not None and not minutes > 0:
            raise TrainingError(f"minutes must be positive, not {minutes}")
        if batch_size < 1:
            raise TrainingError(f"batch size must be at least 1, not {batch_size}")
        if not lr > 0:
            raise TrainingError(f"learning rate must be positive, not {lr}")
        if mode not in ("min", "max"):
            raise TrainingError(f"mode must be 'min' or 'max', not {mode!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise TrainingError(f"the weight-averaging decay must lie between 0 and 1, not {ema_decay}")
        if len(train_set) == 0:
            raise TrainingError("the training set is empty")
        if val_set is not None and len(val_set) == 0:
            raise TrainingError("the validation set is empty")
        if val_set is None and val_fn is None and monitor != "train_loss":
            raise TrainingError(f"no validation set to compute {monitor!r}: give one or monitor 'train_loss'")

        self.loss_fn = loss_fn
        self.forward_fn = forward_fn or default_forward
        self.train_set, self.val_set, self.val_fn = train_set, val_set, val_fn
        self.out_dir = Path(out_dir)
        self.batch_size, self.lr, self.epochs, self.minutes = batch_size, lr, epochs, minutes
        self.num_workers, self.seed, self.deterministic = num_workers, seed, deterministic
        self.monitor, self.mode, self.grad_clip = monitor, mode, grad_clip
        if early_stop_patience is not None and early_stop_patience < 1:
            raise TrainingError(f"early-stopping patience must be at least 1 epoch, not {early_stop_patience}")
        self.early_stop_patience = early_stop_patience
        self.log_every_steps = max(1, int(log_every_steps))
        self.log_every_seconds = float(log_every_seconds)
        self.budget = budget
        self.clock = budget.clock if budget is not None else time.monotonic
        self._given_log = log
        self.on_epoch_end: list[EpochHook] = list(on_epoch_end)
        self.on_epoch_end_every_rank: list[EpochHook] = list(on_epoch_end_every_rank)
        self.info = dict(info or {})
        self.verbose = verbose

        device = select_device(device)
        self.world_size = world_size()
        self.distributed = self.world_size > 1
        self._owns_group = False
        if self.distributed:
            device, self._owns_group = _init_distributed(device)
        self.rank = rank()
        self.is_main = self.rank == 0
        self.device = device

        model = model.to(device)
        # On CPU, oneDNN runs convolutions channels-last about 1.3x faster in training (U-Net,
        # batch 8 of 256 px, one core: 3.3 -> 2.6 s a step; twice as fast in inference), so the
        # model and image batches go to that layout there. Only the memory layout changes.
        self.channels_last = device.type == "cpu" and not _has_strided_pointwise_conv(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.distributed:
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        self.model = model
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            # buffers (batch-norm statistics) are averaged too, so the averaged model is whole
            self.ema = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        if optimizer not in OPTIMIZERS or scheduler not in SCHEDULERS:
            raise TrainingError(f"optimizer one of {OPTIMIZERS}, scheduler one of {SCHEDULERS}; "
                                f"not {optimizer!r}, {scheduler!r}")
        if scheduler == "cosine" and epochs is None:
            raise TrainingError("the cosine schedule needs a number of epochs")
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
            self.optimizer = opt(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.schedule = scheduler
        if scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode=mode, factor=lr_factor, patience=lr_patience, min_lr=min_lr
            )
        elif scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=epochs, eta_min=min_lr)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _epoch: 1.0)
        bf16 = bf16_native(device)
        self.amp = amp_policy(device.type, bf16, amp)
        self._autocast, self.scaler = amp_settings(device, amp, bf16_supported=bf16)

        self.epoch = 0  # epochs completed (a resumed run starts from the checkpoint's)
        self.step = 0  # optimiser steps, over all epochs
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._train_seconds_before = 0.0  # training time of earlier (resumed) runs
        self._stop_requested = False
        self._log: JsonLog | None = None
        self._loader_gen = torch.Generator()
        self._train_loader = self._make_train_loader()

    # -- paths and small helpers

    @property
    def module(self) -> nn.Module:
        """The plain model (inside DDP)."""
        return unwrap(self.model)

    @property
    def eval_module(self) -> nn.Module:
        """The weights to validate and export: the averaged ones with `ema_decay`, else the model's."""
        return self.ema.module if self.ema is not None else self.module

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def request_stop(self) -> None:
        """Stop at the next step boundary, then validate and save as for a finished epoch."""
        self._stop_requested = True

    def _event(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.write(event, **fields)

    def _say(self, text: str) -> None:
        if self.verbose and self.is_main:
            print(text, flush=True)

    def _is_better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best

    def _make_train_loader(self) -> DataLoader:
        if self.distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed
            )
            per_rank = len(sampler)
        else:
            sampler = RandomSampler(self.train_set, generator=self._loader_gen)
            per_rank = len(self.train_set)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # a ragged last batch of 1 breaks BatchNorm; keep it only when it is the only batch
            drop_last=per_rank > self.batch_size,
            worker_init_fn=_seed_worker,
            generator=self._loader_gen,
            # a dataset with set_epoch needs fresh workers to see the new epoch
            persistent_workers=self.num_workers > 0 and not hasattr(self.train_set, "set_epoch"),
        )

    def _make_val_loader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_worker,
        )

    # -- stopping

    def _stop_reason(self, sync: bool) -> str | None:
        """"requested", "time" or None; in DDP all ranks agree (when `sync`) so they stop together."""
        local = 0
        if self._stop_requested:
            local = 2
        elif self._budget.must_stop():
            local = 1
        if self.distributed:
            if not sync:
                return None
            flag = torch.tensor([local], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        return {0: None, 1: "time", 2: "requested"}[local]

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT ask for a clean stop (checkpoint kept); a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.request_stop()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- one epoch

    def _train_epoch(self, epoch: int, t_fit: float) -> tuple[dict, str | None]:
        model, loader = self.model, self._train_loader
        model.train()
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        # shuffling and worker seeds depend on (seed, epoch, rank) only: a resumed run sees
        # the same batches as an uninterrupted one
        self._loader_gen.manual_seed(_derived_seed(self.seed, epoch, self.rank))

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples = 0
        window_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        window_steps = 0
        batches = len(loader)
        reason = None
        i = 0
        clock, budget = self.clock, self._budget
        t0 = t_prev = clock()
        for i, batch in enumerate(loader, 1):
            batch = to_device(batch, self.device, self.channels_last)
            n = batch_len(batch)
            with self._autocast():
                outputs = self.forward_fn(model, batch)
            loss = self.loss_fn(_float32(outputs), batch)  # losses in float32 (softmax at temperature 0.05...)
            self.scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.module)
            self.step += 1
            now = clock()
            budget.note_step(now - t_prev)
            t_prev = now

            # accumulate on the device: a .item() every step would stall the GPU
            value = loss.detach().double()
            loss_sum += value * n
            samples += n
            window_sum += value
            window_steps += 1
            # the first step at once (progress from the start), then every so many steps or seconds
            if (self.step % self.log_every_steps == 0 or self._last_step_event is None
                    or now - self._last_step_event >= self.log_every_seconds):
                self._last_step_event = now
                steps_left = None if self.epochs is None else (self.epochs - epoch) * batches + batches - i
                self._event(
                    "step", epoch=epoch, step=self.step, batch=i, batches=batches,
                    loss=window_sum.item() / window_steps, lr=self.current_lr,
                    seconds=round(now - t_fit, 3), elapsed=round(budget.elapsed(), 1),
                    eta=budget.eta(steps_left, 0 if self.epochs is None else self.epochs - epoch + 1),
                )
                window_sum.zero_()
                window_steps = 0
            reason = self._stop_reason(sync=i % DDP_STOP_CHECK_EVERY == 0 or i == batches)
            if reason is not None:
                break
        seconds = clock() - t0

        totals = torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64, device=self.device)])
        if self.distributed:
            torch.distributed.all_reduce(totals)
        loss_total, count = totals.tolist()
        stats = {
            "train_loss": loss_total / count if count else float("nan"),
            "train_seconds": seconds,
            "samples_per_s": count / seconds if seconds > 0 else float("nan"),
            "partial": reason is not None and i < batches,
        }
        return stats, reason

    def _validate(self) -> dict:
        """Validation metrics ("val_..." names), computed by rank 0 and shared with the others."""
        metrics: dict = {}
        if self.is_main and (self.val_fn is not None or self.val_set is not None):
            model = self.eval_module
            was_training = model.training
            model.eval()
            with torch.no_grad():
                raw = self.val_fn(model, self.val_set, self.device) if self.val_fn else {"loss": self._val_loss(model)}
            model.train(was_training)
            metrics = {(k if k.startswith("val_") else f"val_{k}"): float(v) for k, v in raw.items()}
        if self.distributed:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def _val_loss(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for batch in self._make_val_loader():
            batch = to_device(batch, self.device, self.channels_last)
            n = batch_len(batch)
            with self._autocast():
                outputs = self.forward_fn(model, batch)
            loss = self.loss_fn(_float32(outputs), batch)
            total += float(loss) * n
            count += n
        return total / count if count else float("nan")

    def _checkpoint_state(self, metrics: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "monitor": self.monitor,
            "mode": self.mode,
            "metrics": _jsonable(metrics),
            "train_seconds": self._train_seconds_before + self._seconds(),
            "rng": rng_state(),
            "info": _jsonable(self.info),
        }

    def _seconds(self) -> float:
        return self.clock() - self._t_fit

    @property
    def training_seconds(self) -> float:
        """Training time of this model so far, earlier (resumed) runs included."""
        return self._train_seconds_before + (self._seconds() if hasattr(self, "_t_fit") else 0.0)

    # -- the loop

    def _resume(self) -> None:
        path = self.checkpoint_dir / "last.pt"
        if not path.is_file():
            raise TrainingError(f"cannot resume: {path} does not exist")
        # in DDP every rank would get rank 0's random state; each reseeds per rank instead
        ckpt = load_checkpoint(
            path, self.model, self.optimizer, self.scheduler, self.scaler,
            map_location="cpu", restore_rng=not self.distributed,  # loaders move states to the model's device
        )
        if self.distributed:
            seed_everything(_derived_seed(self.seed, ckpt["epoch"], self.rank) % 2**32, self.deterministic)
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:  # a run without averaging continued with it: the average starts from here
                self.ema.update_parameters(self.module)
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        # a best value of another metric means nothing for this one
        same_metric = ckpt.get("monitor") == self.monitor and ckpt.get("mode") == self.mode
        self.best = ckpt.get("best") if same_metric else None
        self.best_epoch = ckpt.get("best_epoch") if same_metric else None
        self._train_seconds_before = float(ckpt.get("train_seconds", 0.0))

    def fit(self, resume: bool = False) -> dict:
        """Train until `epochs` (total) are done or `minutes` are spent; returns a summary.

        Summary: epochs (completed, in total), best, best_epoch, monitor, seconds (this
        call), train_seconds (all runs), steps, stopped ("epochs", "time", "early" or "requested"),
        device, world_size.
        """
        self._t_fit = self.clock()
        # without a budget from the recipe, the budget starts here
        self._budget = self.budget if self.budget is not None else RunBudget(self.minutes, clock=self.clock)
        self._last_step_event = None  # the clock when the last step event was logged
        self._stop_requested = False
        seed_everything(self.seed + self.rank, self.deterministic)
        if self.is_main:
            if self._given_log is not None:
                self._log, self._given_log = self._given_log, None
            else:
                try:
                    self._log = JsonLog(self.log_path, append=resume)
                except OSError as e:
                    raise TrainingError(f"cannot write the log in {self.out_dir}: {e.strerror or e}") from None
        try:
            if resume:
                self._resume()
            with self._stop_on_signals():
                summary = self._loop(resume)
            if self.distributed:
                # rank 0 may still be in its epoch hooks (export, selective sampling) when the
                # others finish: wait for it, so no rank tears down Gloo's connections under
                # a peer (seen as a SIGABRT of the rank that left first)
                torch.distributed.barrier()
                _leave_together()
        except BaseException as e:
            self._event("error", message=f"{type(e).__name__}: {e}".splitlines()[0])
            raise
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._owns_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
                self._owns_group = False
        return summary

    def _loop(self, resume: bool) -> dict:
        self._event(
            "start", resume=resume, start_epoch=self.epoch + 1, epochs=self.epochs, minutes=self.minutes,
            device=str(self.device), world_size=self.world_size,
            amp=str(self.amp["dtype"]).replace("torch.", "") if self.amp["enabled"] else None,
            batch_size=self.batch_size, lr=self.current_lr, seed=self.seed,
            train_samples=len(self.train_set), val_samples=None if self.val_set is None else len(self.val_set),
            batches_per_epoch=len(self._train_loader), parameters=count_parameters(self.model),
            monitor=self.monitor, mode=self.mode, info=self.info,
            elapsed=round(self._budget.elapsed(), 1), budget_seconds=self._budget.seconds,
            expected_closing=round(self._budget.final_closing_seconds, 1),
        )
        if self._stop_reason(sync=True) == "time":  # the preparation left no time for a step and the closing
            raise TrainingError(
                f"the {self._budget.seconds / 60:g}-minute budget leaves no time to train: "
                f"{self._budget.elapsed():.0f} s went into preparing the data and closing the run takes about "
                f"{self._budget.final_closing_seconds:.0f} s (its validation); give more minutes")
        stopped = "epochs"
        for epoch in itertools.count(self.epoch + 1):
            if self.epochs is not None and epoch > self.epochs:
                break
            t_epoch = self.clock()
            lr = self.current_lr  # the rate this epoch trained with, before the scheduler changes it
            stats, reason = self._train_epoch(epoch, self._t_fit)
            t_close = self.clock()
            self._event("validate", epoch=epoch, elapsed=round(self._budget.elapsed(), 1),
                        expected=round(self._budget.closing_seconds, 1))
            metrics = {"train_loss": stats["train_loss"], **self._validate()}
            if self.monitor not in metrics:
                raise TrainingError(f"monitored metric {self.monitor!r} is not among {', '.join(sorted(metrics))}")
            value = float(metrics[self.monitor])
            if self.schedule == "plateau":
                self.scheduler.step(value)
            else:
                self.scheduler.step()
            is_best = self._is_better(value, self.best)
            if is_best:
                self.best, self.best_epoch = value, epoch
            self.epoch = epoch
            if self.is_main:
                state = self._checkpoint_state(metrics)
                save_checkpoint(self.checkpoint_dir / "last.pt", state)
                if is_best:
                    save_checkpoint(self.checkpoint_dir / "best.pt", state)
            record = {
                "epoch": epoch, **metrics, "lr": lr, "seconds": round(self.clock() - t_epoch, 3),
                "samples_per_s": stats["samples_per_s"], "device": str(self.device), "step": self.step,
                "best": self.best, "is_best": is_best, "partial": stats["partial"],
            }
            last = reason is not None or (self.epochs is not None and epoch >= self.epochs)
            batches = len(self._train_loader)
            self._event("epoch", **record, elapsed=round(self._budget.elapsed(), 1), eta=0.0 if last else self._budget.eta(
                None if self.epochs is None else (self.epochs - epoch) * batches,
                0 if self.epochs is None else self.epochs - epoch))
            total = f"/{self.epochs}" if self.epochs else ""
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self._say(f"epoch {epoch}{total}  {shown}  lr {lr:.3g}  {record['seconds']:.1f} s{'  *' if is_best else ''}")
            for hook in self.on_epoch_end_every_rank:
                hook(self, dict(record))
            if self.is_main:
                for hook in self.on_epoch_end:
                    hook(self, dict(record))
            self._budget.note_closing(self.clock() - t_close)
            if reason is None and self.epochs is not None and epoch >= self.epochs:
                break  # done: "epochs", even if the time budget ran out meanwhile
            if reason is None:
                reason = self._stop_reason(sync=True)
            if (reason is None and self.early_stop_patience is not None and self.best_epoch is not None
                    and epoch - self.best_epoch >= self.early_stop_patience):
                reason = "early"  # the monitored metric has not improved for `early_stop_patience` epochs
            if reason is not None:
                stopped = reason
                break
        summary = {
            "epochs": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "monitor": self.monitor,
            "seconds": round(self._seconds(), 3),
            "train_seconds": round(self._train_seconds_before + self._seconds(), 3),
            "steps": self.step, "stopped": stopped, "device": str(self.device), "world_size": self.world_size,
        }
        self._event("end", **summary, elapsed=round(self._budget.elapsed(), 1))
        best = "none" if self.best is None else f"{self.best:.4g}"
        self._say(f"done: {self.epoch} epochs, best {self.monitor} {best} (epoch {self.best_epoch}), "
                  f"{summary['seconds']:.1f} s on {self.device}, stopped by {stopped}")
        return summary
