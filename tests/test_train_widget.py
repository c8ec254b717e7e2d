"""The Retrain dock, driven as a research group would: train in a separate process, watch, cancel, use the result."""

import numpy as np
import pytest
from qtpy.QtCore import Qt

from conftest import write_exudate_folder
from napari_retina.models.versions import current_model_dir, versions
from napari_retina.widgets.annotator import LesionAnnotator
from napari_retina.widgets.train import MODELS, TrainWidget, read_log

TINY = "--samples-per-epoch 8 --patch-size 32 --scale 1.0 --base-channels 4 --depth 2 --val-images IDRiD_03.png"


@pytest.fixture
def ex_folder(tmp_path):
    """Three flat-layout images, each with a few bright exudate blobs and their masks."""
    return write_exudate_folder(tmp_path / "ex")


@pytest.fixture
def docks(make_napari_viewer, qtbot, ex_folder):
    viewer = make_napari_viewer()
    viewer.open(str(ex_folder), plugin="napari-retina")
    ann = LesionAnnotator(viewer, preload_model=False)
    viewer.window.add_dock_widget(ann)
    qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    yield viewer, ann, train
    if train.process is not None:
        train.process.kill()
        train.process.waitForFinished(5000)
    ann.flush()
    ann._timer.stop()


def _form(train, epochs):
    train.model_combo.setCurrentText("hard-exudate segmenter")
    train.start_combo.setCurrentText("scratch")
    train.device_combo.setCurrentText("cpu")
    train.epochs_spin.setValue(epochs)
    train.batch_spin.setValue(4)
    train.extra_edit.setText(TINY)


def test_train_in_a_separate_process_watch_the_plot_and_swap_the_new_version_in(docks, qtbot, ex_folder):
    viewer, ann, train = docks
    assert train.data_edit.text() == str(ex_folder)  # the folder open now
    assert "hard-exudate segmenter" in MODELS and train.device_combo.findText("cpu") >= 0
    _form(train, epochs=2)
    shipped = current_model_dir("exudates")
    qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
    assert train.process is not None and not train.start_button.isEnabled()
    bar = []  # napari's progress bar: the values it was given, epoch by epoch
    train._pbar.events.value.connect(lambda e: bar.append(e.value))
    qtbot.wait(300)
    assert ann.opened is not None  # the GUI is not blocked while the training process runs
    qtbot.waitUntil(lambda: train.process is None, timeout=180000)
    assert bar and bar[-1] == 2 and bar == sorted(bar)
    xs, ys = train.loss_curve.getData()
    assert list(xs) == [1, 2] and np.isfinite(ys).all()  # the live plot: one point per epoch
    assert len(train.val_curve.getData()[0]) == 2
    assert "new exudates version" in train.result.text() and "in use" in train.result.text(), train.result.text()
    out = train.out
    assert (out / "config.json").is_file() and any(v.folder == out for v in versions("exudates"))
    # both versions scored on the new one's validation images by napari-retina evaluate, in the background
    qtbot.mouseClick(train.compare_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: train.compare_label.text().startswith("on the same"), timeout=120000)
    text = train.compare_label.text()
    assert "on the same 1 validation images" in text and text.count("AUPR") == 2, text
    ann.exudate_finder.segmenter = object()  # as if a model had been loaded before
    qtbot.mouseClick(train.use_button, Qt.MouseButton.LeftButton)
    assert current_model_dir("exudates") == out.resolve() != shipped
    assert ann.exudate_finder.segmenter is None  # the next Find loads the new version
    # the annotator reloads the refiner in the background too: let it finish before the window goes
    qtbot.waitUntil(lambda: ann.refinement.refiner is not None or bool(ann.refinement.model_error), timeout=60000)
    from napari_retina.segmentation import load_segmenter

    assert load_segmenter("EX").version == out.name
    # the previous version stays and can be chosen again
    train._refresh_versions()
    row = [i for i, v in enumerate(train._versions) if v.shipped][0]
    train.version_list.setCurrentRow(row)
    qtbot.mouseClick(train.select_button, Qt.MouseButton.LeftButton)
    assert current_model_dir("exudates") == shipped


def test_cancel_stops_the_process_and_keeps_the_best_epoch(docks, qtbot):
    viewer, ann, train = docks
    _form(train, epochs=200)
    qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(e.get("event") == "epoch" for e in train.events), timeout=120000)
    qtbot.mouseClick(train.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: train.process is None, timeout=60000)
    assert "cancelled" in train.result.text()
    assert (train.out / "config.json").is_file() and (train.out / "run" / "log.jsonl").is_file()
    epochs = [e for e in read_log(train.out / "run" / "log.jsonl")[0] if e.get("event") == "epoch"]
    assert 1 <= len(epochs) < 200
    # Resume picks the run up from its last checkpoint, in the same folder
    assert train.resume_button.isEnabled()
    qtbot.mouseClick(train.resume_button, Qt.MouseButton.LeftButton)
    assert "--resume" in train._last_args and train.process is not None
    n = len(epochs)
    qtbot.waitUntil(lambda: len([e for e in train.events if e.get("event") == "epoch"]) > n, timeout=120000)
    train.cancel()
    qtbot.waitUntil(lambda: train.process is None, timeout=60000)
    log = read_log(train.out / "run" / "log.jsonl")[0]
    resumed = [e for e in log if e.get("event") == "start"][-1]
    assert resumed["resume"] is True and resumed["start_epoch"] == n + 1


def test_a_missing_data_folder_or_no_budget_is_one_message_and_starts_nothing(docks, tmp_path):
    viewer, ann, train = docks
    data = train.data_edit.text()
    train.data_edit.setText(str(tmp_path / "nowhere"))
    train.start()
    assert train.process is None and train.start_button.isEnabled()
    train.data_edit.setText(data)
    train.epochs_spin.setValue(0)  # "no limit"
    train.minutes_spin.setValue(0)  # "no limit"
    with pytest.raises(ValueError, match="epochs or minutes"):
        train.command()
    train.start()
    assert train.process is None
    train.minutes_spin.setValue(30)
    args, out, kind = train.command()
    assert "--minutes" in args and "--epochs" not in args


def test_the_log_reader_waits_for_half_written_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"event": "start"}\n{"event": "ep')
    events, off = read_log(log)
    assert events == [{"event": "start"}]
    with open(log, "a") as f:
        f.write('och", "epoch": 1}\n')
    more, _ = read_log(log, off)
    assert more == [{"event": "epoch", "epoch": 1}]


def test_train_elsewhere_writes_a_bundle_that_trains_and_imports_back(docks, qtbot, tmp_path):
    import subprocess
    import sys

    viewer, ann, train = docks
    _form(train, epochs=1)
    train.start_combo.setCurrentText("the version in use")
    with qtbot.waitSignal(train.bundle_written, timeout=60000) as sig:
        train.write_bundle(tmp_path / "bundle")
    summary = sig.args[0]
    bundle = tmp_path / "bundle"
    assert summary["images"] == 3 and (bundle / "init" / "config.json").is_file()
    script = (bundle / "train.sh").read_text()
    assert "--init init" in script and "--data data --out runs/model" in script
    # on the "GPU server": the exact command, from the bundle, with a checkout on PYTHONPATH
    cmd = script.splitlines()[2]
    # the shipped model (16 channels, depth 4) does not fit the tiny network of this test: train from scratch
    cmd = cmd.replace("--init init", "")
    import shlex
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, *shlex.split(cmd)[1:]], cwd=bundle, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-500:]
    imported = train.import_model(bundle / "runs" / "model")
    assert imported is not None and any(v.folder == imported for v in versions("exudates"))
    assert current_model_dir("exudates") == imported.resolve()  # imported to be used


def test_the_recipe_options_form_is_built_from_the_recipe_and_only_changes_reach_the_command(docks, qtbot):
    viewer, ann, train = docks
    train.model_combo.setCurrentText("hard-exudate segmenter")
    qtbot.waitUntil(lambda: "exudates" in train.options_box.title(), timeout=60000)
    flags = set(train.option_widgets)
    assert {"--loss", "--backbone", "--lr", "--optimizer", "--scheduler", "--rim-margin"} <= flags
    assert not flags & {"--data", "--out", "--epochs", "--device", "--init"}  # the main form's
    assert train.option_args() == []  # the defaults are the recipe's: nothing to add
    opt, loss = train.option_widgets["--loss"]
    assert opt["choices"] == ["bce", "wbce", "contrastive"] and loss.value == "contrastive"
    loss.value = "bce"
    train.option_widgets["--lr"][1].value = "0.0003"
    train.option_widgets["--patience"][1].value = 4  # an int option: a spin box
    assert train.option_args() == ["--loss", "bce", "--lr", "0.0003", "--patience", "4"]
    train.option_widgets["--lr"][1].value = "fast"
    with pytest.raises(ValueError, match="--lr"):
        train.option_args()
    # another model, another recipe: its own options (the HGN's scale is set by the model choice)
    train.model_combo.setCurrentText("microaneurysm HGN, half scale")
    qtbot.waitUntil(lambda: "ma-hgn" in train.options_box.title(), timeout=60000)
    assert "--scale" not in train.option_widgets and train.option_widgets["--loss"][1].value == "wbce-dice"


def test_use_this_model_changes_what_the_annotator_refines_with(docks, qtbot, tmp_path):
    import json
    import shutil

    from napari_retina.models.registry import shipped_model_dir

    viewer, ann, train = docks
    mine = tmp_path / "refiner-mine"
    shutil.copytree(shipped_model_dir("refiner"), mine)
    cfg = json.loads((mine / "config.json").read_text())
    cfg["version"] = "2026.12.02-mine"  # a version trained elsewhere (the weights, and their checksum, as shipped)
    (mine / "config.json").write_text(json.dumps(cfg))
    train.model_combo.setCurrentText("ellipse refiner")
    imported = train.import_model(mine)  # imported, so put in use
    assert imported is not None and current_model_dir("refiner") == imported.resolve()
    qtbot.waitUntil(lambda: ann.refinement.refiner is not None, timeout=60000)
    assert ann.refinement.refiner.version == "2026.12.02-mine"


REFINER_TINY = "--patch-size 64 --samples-per-epoch 8 --base-channels 4 --reduction 1.0 --val-images IDRiD_03.png"


def test_ticked_models_train_one_after_the_other_each_with_its_own_options(docks, qtbot):
    viewer, ann, train = docks
    train.model_combo.setCurrentText("ellipse refiner")
    train.extra_edit.setText(REFINER_TINY)
    _form(train, epochs=1)  # the exudate segmenter shown, with its own options line
    train.model_combo.setCurrentText("ellipse refiner")
    assert train.extra_edit.text() == REFINER_TINY  # each model keeps its line
    train.model_combo.setCurrentText("hard-exudate segmenter")
    assert train.extra_edit.text() == TINY
    for label in ("ellipse refiner", "hard-exudate segmenter"):  # the one shown is not trained twice
        train.queue_list.findItems(label, Qt.MatchFlag.MatchExactly)[0].setCheckState(Qt.CheckState.Checked)
    assert train.queued() == ["ellipse refiner"]
    qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(train._done_runs) == 2 and train.process is None, timeout=300000)
    assert [k for k, _, _ in train._done_runs] == ["exudates", "refiner"]
    assert "--reduction" in train._last_args and "--scale" not in train._last_args  # the refiner's own line
    assert train.result.text().count("new ") == 2 and train.use_button.text() == "Use these 2 models"
    outs = [o for _, o, _ in train._done_runs]
    qtbot.mouseClick(train.use_button, Qt.MouseButton.LeftButton)
    assert [current_model_dir(k) for k in ("exudates", "refiner")] == [o.resolve() for o in outs]
    qtbot.waitUntil(lambda: ann.refinement.refiner is not None or bool(ann.refinement.model_error), timeout=60000)
    r = ann.refinement
    assert r.refiner is not None, (r.model_error, r._loading, r._reload, r.model_dir)
    assert ann.refinement.refiner.version == outs[1].name


def test_closing_the_dock_while_it_asks_the_recipe_for_its_options_is_harmless(make_napari_viewer, qtbot):
    from qtpy.QtCore import QCoreApplication, QProcess

    def describing():
        return [c for c in QCoreApplication.instance().children() if isinstance(c, QProcess)]

    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    assert len(describing()) == 1  # `--describe-options` is running
    viewer.window.remove_dock_widget(train)
    train.deleteLater()
    qtbot.waitUntil(lambda: not describing(), timeout=30000)  # it finishes and is cleaned up, no crash


def test_a_training_process_that_cannot_start_ends_the_run_and_its_progress_bar(docks, qtbot, monkeypatch):
    import sys

    viewer, ann, train = docks
    _form(train, epochs=2)
    monkeypatch.setattr(sys, "executable", str(train.data_edit.text()) + "/no-python-here")
    train.start()
    qtbot.waitUntil(lambda: train.process is None, timeout=10000)
    assert train._pbar is None and train._slowed is None and train.start_button.isEnabled()
    assert "without a model" in train.status.text()
