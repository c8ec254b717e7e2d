"""training.trainer on CPU: a tiny conv net learns a threshold of its 16x16 input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from training.losses import bce_dice_loss
from training.trainer import (
    Trainer,
    TrainingError,
    amp_policy,
    amp_settings,
    count_parameters,
    is_main_process,
    load_checkpoint,
    select_device,
    unwrap,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


class ThresholdSet(torch.utils.data.Dataset):
    """Noise images; the target is where the image is above 0.3."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 16, 16, generator=g)
        self.targets = (self.images > 0.3).float()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "target": self.targets[i]}


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))


def loss_fn(outputs, batch):
    return bce_dice_loss(outputs, batch["target"])


def make_trainer(out_dir: Path, model: nn.Module | None = None, **kw) -> Trainer:
    kw = {"device": "cpu", "batch_size": 8, "lr": 3e-2, "epochs": 3, "seed": 0, "verbose": False, **kw}
    return Trainer(model or tiny_net(), loss_fn, ThresholdSet(32, 1), ThresholdSet(16, 2), out_dir, **kw)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def epoch_events(out_dir: Path) -> list[dict]:
    return [e for e in read_log(out_dir) if e["event"] == "epoch"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- training, log, checkpoints -------------------------------------------------------------------


def test_loss_falls_and_the_log_follows_the_run(tmp_path):
    summary = make_trainer(tmp_path, epochs=6, log_every_steps=2, log_every_seconds=1e9).fit()
    log = read_log(tmp_path)
    assert [e["event"] for e in log][0] == "start" and log[-1]["event"] == "end"
    epochs = [e for e in log if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6]
    first, last = epochs[0], epochs[-1]
    assert last["train_loss"] < 0.7 * first["train_loss"]
    assert last["val_loss"] < 0.7 * first["val_loss"]
    for e in epochs:
        assert e["device"] == "cpu" and e["lr"] == pytest.approx(3e-2)
        assert e["seconds"] > 0 and e["samples_per_s"] > 0 and e["partial"] is False
    # 32 samples in batches of 8: 4 steps an epoch, the first step at once, then a step event every 2 steps
    steps = [e for e in log if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, *range(2, 25, 2)]
    # with epochs and no budget, the estimate of what is left falls to the last closing
    assert all(e["eta"] >= 0 for e in steps) and steps[0]["eta"] > steps[-1]["eta"]
    assert [e["epoch"] for e in log if e["event"] == "validate"] == [1, 2, 3, 4, 5, 6]
    assert all(e["batches"] == 4 and e["loss"] > 0 for e in steps)
    assert summary["epochs"] == 6 and summary["steps"] == 24 and summary["stopped"] == "epochs"
    assert summary["device"] == "cpu" and summary["best"] == pytest.approx(min(e["val_loss"] for e in epochs))
    assert log[-1]["best"] == pytest.approx(summary["best"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_checkpoint_round_trip(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.fit()
    fresh = tiny_net(seed=123)
    assert not same_weights(fresh.state_dict(), trainer.module.state_dict())
    optimizer = torch.optim.Adam(fresh.parameters(), lr=1.0)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt", fresh, optimizer)
    assert same_weights(fresh.state_dict(), trainer.module.state_dict())
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-2)
    saved, live = optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k]["exp_avg"], live[k]["exp_avg"]) for k in live)
    # best.pt holds the epoch with the lowest validation loss
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    val = {e["epoch"]: e["val_loss"] for e in epoch_events(tmp_path)}
    assert best["epoch"] == min(val, key=val.get) == best["best_epoch"]


def test_checkpoint_for_another_model_is_a_training_error(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    other = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(TrainingError, match="do not fit"):
        load_checkpoint(tmp_path / "checkpoints" / "last.pt", other)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt", tiny_net())


def test_resume_continues_the_epoch_count_and_matches_an_uninterrupted_run(tmp_path):
    make_trainer(tmp_path / "a", epochs=2).fit()
    summary = make_trainer(tmp_path / "a", model=tiny_net(seed=99), epochs=3).fit(resume=True)
    assert summary["epochs"] == 3 and summary["steps"] == 12
    assert [e["epoch"] for e in epoch_events(tmp_path / "a")] == [1, 2, 3]
    assert [e["event"] for e in read_log(tmp_path / "a")].count("start") == 2
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["epoch"] == 3

    straight = make_trainer(tmp_path / "b", epochs=3)
    straight.fit()
    resumed = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    assert same_weights(resumed, straight.module.state_dict())


def test_resume_at_the_target_trains_nothing_more(tmp_path):
    make_trainer(tmp_path, epochs=2).fit()
    summary = make_trainer(tmp_path, epochs=2).fit(resume=True)
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert [e["epoch"] for e in epoch_events(tmp_path)] == [1, 2]


def test_resume_without_a_checkpoint_is_a_training_error(tmp_path):
    with pytest.raises(TrainingError, match="cannot resume"):
        make_trainer(tmp_path).fit(resume=True)
    assert read_log(tmp_path)[-1]["event"] == "error"


class FakeClock:
    """A clock that moves only when told: each training step and each validation "takes" set seconds."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def budget_trainer(tmp_path, clock, minutes, step_s, val_s, prepared_s=0.0, expect=None, **kw):
    """A trainer on `clock` whose steps take `step_s` and validations `val_s`, in a run whose data
    preparation took `prepared_s` (the budget started that long before the trainer)."""
    from training.trainer import RunBudget

    budget = RunBudget(minutes, clock=clock, started=clock.t)
    clock.t += prepared_s
    if expect is not None:
        budget.expect_closing(expect)

    def timed_loss(outputs, batch):
        clock.t += step_s
        return loss_fn(outputs, batch)

    def val_fn(model, _val, _device):
        clock.t += val_s
        return {"loss": 1.0}

    kw = {"device": "cpu", "batch_size": 8, "lr": 3e-2, "seed": 0, "verbose": False, **kw}
    trainer = Trainer(tiny_net(), timed_loss, ThresholdSet(32, 1), None, tmp_path, val_fn=val_fn, budget=budget,
                      log_every_steps=1000, log_every_seconds=5, **kw)
    return trainer, budget


def test_the_budget_bounds_the_whole_run_with_an_injected_clock(tmp_path):
    # 2 minutes; data preparation took 20 s; a step takes 1 s, a validation 10 s (the recipe's estimate)
    clock = FakeClock()
    trainer, budget = budget_trainer(tmp_path / "a", clock, 2, step_s=1.0, val_s=10.0, prepared_s=20.0, expect=10.0)
    summary = trainer.fit()
    assert summary["stopped"] == "time"
    ended = clock.t - budget.started
    assert ended <= 120.0, ended  # the last validation included
    assert ended >= 120.0 - 1.0 - 2 * 10.0 * budget.SAFETY  # and little of it left unused
    # 32 samples in batches of 8: 4 steps an epoch, each epoch validated (10 s): 20 + k epochs of 14 s
    log = read_log(tmp_path / "a")
    epochs = [e for e in log if e["event"] == "epoch"]
    assert epochs[-1]["partial"] is True or epochs[-1]["elapsed"] <= 120
    # progress from the first step on, every 5 s of the clock after it, with what is left to come
    steps = [e for e in log if e["event"] == "step"]
    assert steps[0]["step"] == 1 and steps[0]["elapsed"] == pytest.approx(21.0)
    assert steps[0]["eta"] == pytest.approx(120 - 21.0)
    progress = [e for e in log if e["event"] in ("step", "validate", "epoch")]
    assert all(b["elapsed"] - a["elapsed"] <= 10.0 + 1.0 for a, b in zip(progress, progress[1:]))  # never silent
    assert log[-1]["event"] == "end" and log[-1]["elapsed"] == pytest.approx(ended)


def test_without_the_recipes_estimate_the_first_validation_is_measured_and_kept_to(tmp_path):
    # no estimate: 10 % of the budget is assumed for the closing until one validation is timed
    clock = FakeClock()
    trainer, budget = budget_trainer(tmp_path, clock, 1, step_s=1.0, val_s=3.0)
    summary = trainer.fit()
    ended = clock.t - budget.started
    assert summary["stopped"] == "time" and ended <= 60.0, ended
    assert budget.closing_seconds == pytest.approx(3.0 * budget.SAFETY)  # measured on the epochs before


def test_a_budget_spent_on_preparing_the_data_is_a_one_line_error(tmp_path):
    clock = FakeClock()
    trainer, _ = budget_trainer(tmp_path, clock, 1, step_s=1.0, val_s=10.0, prepared_s=55.0, expect=10.0)
    with pytest.raises(TrainingError, match="budget leaves no time to train.*give more minutes"):
        trainer.fit()
    assert read_log(tmp_path)[-1]["event"] == "error"
    assert not (tmp_path / "checkpoints").exists()


def test_the_stop_rule(tmp_path):
    from training.trainer import RunBudget

    clock = FakeClock(0.0)
    b = RunBudget(1, clock=clock)  # 60 s from 0
    assert not b.must_stop() and b.closing_seconds == pytest.approx(6.0)  # 10 % assumed
    b.expect_closing(10.0)
    b.note_step(2.0)
    clock.t = 60 - 2.0 - 10.0 * b.SAFETY - 0.01
    assert not b.must_stop()
    clock.t += 0.02
    assert b.must_stop()
    b.note_closing(4.0)  # measured: replaces the estimate
    assert b.closing_seconds == pytest.approx(4.0 * b.SAFETY) and not b.must_stop()
    b.finish_factor = 3.0  # a recipe with more work at its very end
    assert b.must_stop()
    b.finish_factor = 1.0
    for _ in range(8):  # the steps now take twice as long (another process on the cores): so will the closing
        b.note_step(4.0)
    assert b.closing_seconds == pytest.approx(4.0 * b.SAFETY * 2.0)
    b.note_closing(8.0)  # measured at the slower pace: no further factor
    assert b.closing_seconds == pytest.approx(8.0 * b.SAFETY)
    assert RunBudget(None, clock=clock).must_stop() is False and RunBudget(None, clock=clock).eta() is None
    clock.t = 50.0
    assert b.eta() == pytest.approx(10.0)  # the budget's end
    assert b.eta(steps_left=1, closings_left=1) == pytest.approx(10.0)  # the budget ends first
    clock.t = 30.0  # one 4-s step and the closing (8 s x SAFETY) come before the budget's end
    assert b.eta(steps_left=1, closings_left=1) == pytest.approx(4.0 + 8.0 * b.SAFETY, abs=0.05)
    assert b.eta(steps_left=0, closings_left=0) == 0.0


def test_request_stop_from_a_hook_and_hooks_see_each_epoch(tmp_path):
    seen = []

    def hook(trainer, metrics):
        seen.append((trainer.epoch, metrics["epoch"], metrics["is_best"], (trainer.checkpoint_dir / "last.pt").is_file()))
        if metrics["epoch"] == 2:
            trainer.request_stop()

    summary = make_trainer(tmp_path, epochs=10, on_epoch_end=[hook]).fit()
    assert summary["stopped"] == "requested" and summary["epochs"] == 2
    assert [s[:2] for s in seen] == [(1, 1), (2, 2)]
    assert seen[0][2] is True and all(s[3] for s in seen)  # the first epoch is always the best so far


def test_sigterm_stops_cleanly_and_the_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    summary = make_trainer(
        tmp_path, epochs=10, on_epoch_end=[lambda t, m: os.kill(os.getpid(), signal.SIGTERM)]
    ).fit()
    assert summary["stopped"] == "requested" and summary["epochs"] == 1
    assert read_log(tmp_path)[-1]["event"] == "end"
    assert signal.getsignal(signal.SIGTERM) is before


def test_scripted_validation_drives_best_checkpoint_and_lr_schedule(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 0.5, 0.4])

    def val_fn(model, val_set, device):
        assert not model.training and not torch.is_grad_enabled() and device == torch.device("cpu")
        return {"score": next(scores), "val_other": 7}

    saved = []
    hook = lambda t, m: saved.append(load_checkpoint(t.checkpoint_dir / "best.pt")["epoch"])  # noqa: E731
    summary = make_trainer(
        tmp_path, epochs=5, val_fn=val_fn, monitor="val_score", mode="max", lr_patience=1, on_epoch_end=[hook]
    ).fit()
    events = epoch_events(tmp_path)
    assert [e["val_score"] for e in events] == [1.0, 3.0, 2.0, 0.5, 0.4]
    assert all(e["val_other"] == 7 and "val_loss" not in e for e in events)
    assert [e["is_best"] for e in events] == [True, True, False, False, False]
    assert saved == [1, 2, 2, 2, 2]
    assert summary["best"] == 3.0 and summary["best_epoch"] == 2
    # two epochs without improvement (more than lr_patience=1) halve the rate for epoch 5
    assert [e["lr"] for e in events] == pytest.approx([3e-2] * 4 + [1.5e-2])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 5


def test_unknown_monitor_is_a_training_error_and_logged(tmp_path):
    with pytest.raises(TrainingError, match="val_iou"):
        make_trainer(tmp_path, epochs=1, monitor="val_iou").fit()
    assert read_log(tmp_path)[-1]["event"] == "error"


def test_bad_arguments_are_training_errors(tmp_path):
    with pytest.raises(TrainingError, match="epochs"):
        make_trainer(tmp_path, epochs=None, minutes=None)
    with pytest.raises(TrainingError, match="mode"):
        make_trainer(tmp_path, mode="best")
    with pytest.raises(TrainingError, match="validation"):
        Trainer(tiny_net(), loss_fn, ThresholdSet(8, 1), None, tmp_path, epochs=1)


def test_weight_averaging_is_validated_and_follows_the_ema_formula(tmp_path):
    decay = 0.6
    raw_seen, validated = [], []

    def forward(model, batch):
        if model.training:  # the weights each training step starts from
            raw_seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model(batch["image"])

    def val_fn(model, val_set, device):
        validated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": 0.0}

    trainer = make_trainer(tmp_path, epochs=1, ema_decay=decay, forward_fn=forward, val_fn=val_fn)
    trainer.fit()
    # weights after steps 1..4: what steps 2..4 started from, then the final ones
    after = raw_seen[1:] + [{k: v.detach().clone() for k, v in trainer.module.state_dict().items()}]
    assert len(after) == 4
    expected = dict(after[0])  # the first update copies
    for w in after[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
    for k, v in expected.items():
        torch.testing.assert_close(validated[0][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trainer.eval_module.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not same_weights(validated[0], after[-1])  # the raw weights are not what was validated
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert same_weights(ckpt["model"], after[-1]) and ckpt["ema"]["n_averaged"].item() == 4


def test_weight_averaging_resumes_as_an_uninterrupted_run(tmp_path):
    make_trainer(tmp_path / "a", epochs=2, ema_decay=0.9).fit()
    make_trainer(tmp_path / "a", model=tiny_net(seed=99), epochs=3, ema_decay=0.9).fit(resume=True)
    straight = make_trainer(tmp_path / "b", epochs=3, ema_decay=0.9)
    straight.fit()
    resumed = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["ema"]
    assert same_weights(resumed, straight.ema.state_dict())
    with pytest.raises(TrainingError, match="between 0 and 1"):
        make_trainer(tmp_path / "c", ema_decay=1.0)
    # a run without averaging, continued with it: the average starts from the weights it resumes
    make_trainer(tmp_path / "d", epochs=1).fit()
    raw = load_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt")["model"]
    seen = []

    def val_fn(model, val_set, device):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": 0.0}

    resumed = make_trainer(tmp_path / "d", model=tiny_net(seed=5), epochs=2, ema_decay=0.999999, val_fn=val_fn)
    resumed.fit(resume=True)
    assert all((seen[0][k] - raw[k]).abs().max() < 1e-4 for k in raw)  # decay ~1: still the resumed weights


def test_channels_last_on_cpu_except_for_strided_pointwise_convolutions(tmp_path):
    plain = make_trainer(tmp_path / "a", epochs=1)
    assert plain.channels_last and plain.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    # a residual shortcut (1x1, stride 2) on 8 channels: its channels-last backward crashes torch 2.13 on CPU
    torch.manual_seed(0)
    shortcut = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2), nn.Upsample(scale_factor=2),
                             nn.Conv2d(8, 1, 1))
    trainer = make_trainer(tmp_path / "b", model=shortcut, epochs=1)
    assert not trainer.channels_last
    assert trainer.fit()["epochs"] == 1


def test_gradient_clipping_limits_the_update(tmp_path):
    # Adam divides by sqrt(v) + 1e-8: gradients clipped far below 1e-8 barely move the weights
    start = tiny_net().state_dict()
    clipped = make_trainer(tmp_path / "c", epochs=1, grad_clip=1e-14)
    free = make_trainer(tmp_path / "f", epochs=1)
    clipped.fit()
    free.fit()
    moved = lambda t: max((t.module.state_dict()[k] - start[k]).abs().max().item() for k in start)  # noqa: E731
    assert moved(clipped) < 1e-4 < 1e-3 < moved(free)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        t = make_trainer(tmp_path / name, epochs=2, seed=seed)
        t.fit()
        runs[name] = t.module.state_dict()
    assert same_weights(runs["a"], runs["b"])
    assert not same_weights(runs["a"], runs["c"])  # the seed drives the shuffling


class EpochAwareSet(ThresholdSet):
    """Like ThresholdSet, plus the epoch the trainer announced through set_epoch."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return {**super().__getitem__(i), "epoch": torch.tensor(self.epoch)}


def test_workers_see_each_epoch_and_change_nothing(tmp_path):
    def run(name, workers):
        current = []

        def loss(outputs, batch):
            if "epoch" in batch:  # training batches only
                assert (batch["epoch"] == current[-1]).all(), "a worker missed set_epoch"
            return loss_fn(outputs, batch)

        def track(trainer, metrics):
            current.append(metrics["epoch"] + 1)

        current.append(1)
        t = Trainer(tiny_net(), loss, EpochAwareSet(32, 1), ThresholdSet(16, 2), tmp_path / name, device="cpu",
                    batch_size=8, lr=3e-2, epochs=2, num_workers=workers, on_epoch_end=[track], verbose=False)
        t.fit()
        return t.module.state_dict()

    assert same_weights(run("w0", 0), run("w2", 2))


def test_helpers():
    net = tiny_net()
    assert count_parameters(net) == (1 * 8 * 9 + 8) + (8 + 1)
    assert unwrap(net) is net
    assert is_main_process()


# ---- device and mixed precision ---------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_select_device_without_gpu():
    assert select_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            select_device(spec)


def test_select_device_specs():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    assert issubclass(TrainingError, ValueError)
    for spec in ("bogus", "gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(TrainingError):
            select_device(spec)


def test_amp_policy():
    assert amp_policy("cuda", True) == {"enabled": True, "dtype": torch.bfloat16, "use_scaler": False}
    assert amp_policy("cuda", False) == {"enabled": True, "dtype": torch.float16, "use_scaler": True}
    assert amp_policy("cpu", True) == {"enabled": True, "dtype": torch.bfloat16, "use_scaler": False}
    assert amp_policy("cpu", False) == {"enabled": False, "dtype": None, "use_scaler": False}
    for bf16 in (True, False):
        assert amp_policy("cuda", bf16, enabled=False)["enabled"] is False
        assert amp_policy("cpu", bf16, enabled=False)["enabled"] is False
        assert amp_policy("mps", bf16)["enabled"] is False


def test_amp_settings_on_a_cpu_without_native_bfloat16_do_nothing():
    autocast, scaler = amp_settings(torch.device("cpu"), bf16_supported=False)
    with autocast():
        assert not torch.is_autocast_enabled("cpu")
        y = nn.Linear(4, 4)(torch.ones(1, 4))
    assert y.dtype == torch.float32
    assert not scaler.is_enabled()
    loss = y.sum()
    assert scaler.scale(loss) is loss  # a disabled scaler passes the loss through


def test_bfloat16_training_on_cpu_keeps_weights_and_loss_in_float32(tmp_path, monkeypatch):
    import training.trainer as trainer_module

    # emulated where the CPU has no bfloat16 instructions: the same arithmetic, only slower
    monkeypatch.setattr(trainer_module, "bf16_native", lambda device: True)
    seen = []

    def forward(model, batch):
        out = model(batch["image"])
        seen.append(out.dtype)
        return out

    def loss(outputs, batch):
        seen.append(outputs.dtype)
        return loss_fn(outputs, batch)

    trainer = Trainer(tiny_net(), loss, ThresholdSet(32, 1), ThresholdSet(16, 2), tmp_path, device="cpu", epochs=2,
                      lr=3e-2, verbose=False, forward_fn=forward)
    assert trainer.amp["enabled"]
    trainer.fit()
    assert seen[0] == torch.bfloat16 and seen[1] == torch.float32  # the network in bfloat16, the loss in float32
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
    val = [e["val_loss"] for e in epoch_events(tmp_path)]
    assert val[-1] < val[0]
    off = Trainer(tiny_net(), loss_fn, ThresholdSet(32, 1), None, tmp_path / "off", device="cpu", epochs=1,
                  monitor="train_loss", amp=False, verbose=False)
    assert not off.amp["enabled"]


def test_amp_settings_for_cuda_decide_without_touching_the_gpu():
    autocast, scaler = amp_settings(torch.device("cuda"), bf16_supported=True)
    assert autocast.keywords == {"device_type": "cuda", "dtype": torch.bfloat16}
    assert not scaler.is_enabled()


# ---- DistributedDataParallel ---------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_trainer import make_trainer, tiny_net
    from training.trainer import rank
    out = Path(sys.argv[1])

    def slow_export(trainer, metrics):  # rank 0 only, as an export or a sampling refresh
        time.sleep(1.5)
        (out / "hook_done").write_text(repr(time.time()))

    def every_rank(trainer, metrics):  # as a sampler refresh: in each process
        (out / f"every_rank{{trainer.rank}}_epoch{{metrics['epoch']}}").touch()

    trainer = make_trainer(out, epochs=2, batch_size=4, log_every_steps=1, on_epoch_end=[slow_export],
                           on_epoch_end_every_rank=[every_rank])
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    summary = trainer.fit()
    (out / f"left{{trainer.rank}}").write_text(repr(time.time()))
    torch.save(trainer.module.state_dict(), out / f"rank{{trainer.rank}}.pt")
    assert not torch.distributed.is_initialized() and summary["world_size"] == 2
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(out)
    # only rank 0 logs: one start, one end, each epoch once
    assert [e["event"] for e in log].count("start") == 1 and log[-1]["event"] == "end"
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2]
    assert log[0]["world_size"] == 2
    # 32 samples over 2 ranks in batches of 4: 4 steps per epoch on each rank
    assert log[0]["batches_per_epoch"] == 4 and log[-1]["steps"] == 8
    # gradients are averaged across ranks, so both end with the same weights, which last.pt holds
    w0, w1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert same_weights(w0, w1)
    assert same_weights(w0, load_checkpoint(out / "checkpoints" / "last.pt")["model"])
    assert sorted(p.name for p in out.glob("every_rank*")) == [
        f"every_rank{r}_epoch{e}" for r in (0, 1) for e in (1, 2)]
    # no rank leaves before rank 0's last epoch hook has finished (it would tear Gloo down under it)
    assert float((out / "left1").read_text()) >= float((out / "hook_done").read_text())


@pytest.mark.parametrize("optimizer, scheduler", [("adamw", "cosine"), ("sgd", "none")])
def test_the_optimiser_and_schedule_are_options(tmp_path, optimizer, scheduler):
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    data = [{"image": x[i], "target": y[i]} for i in range(32)]
    model = torch.nn.Linear(3, 1)
    trainer = Trainer(model, lambda out, b: torch.nn.functional.mse_loss(out, b["target"]), data, data, tmp_path,
                      device="cpu", batch_size=8, lr=0.05, epochs=3, optimizer=optimizer, scheduler=scheduler,
                      monitor="val_loss", verbose=False)
    assert type(trainer.optimizer).__name__.lower() == optimizer
    trainer.fit()
    lrs = [e["lr"] for e in (json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()) if e["event"] == "epoch"]
    if scheduler == "cosine":
        assert lrs[0] == pytest.approx(0.05) and lrs[-1] < lrs[0]  # annealed
    else:
        assert lrs == [pytest.approx(0.05)] * 3
    assert trainer.training_seconds > 0
    with pytest.raises(TrainingError, match="cosine"):
        Trainer(model, lambda o, b: o.sum(), data, data, tmp_path / "x", device="cpu", minutes=1, scheduler="cosine")
