"""The Retrain dock, driven as a research group would: opened from the Plugins menu, bound to the
viewer's annotation session; train in a separate process, watch, cancel, use the result."""

import json
import shutil

import numpy as np
import pytest
from qtpy.QtCore import Qt

import napari_retina.widgets.train as train_module
from conftest import write_exudate_folder
from napari_retina.models.versions import current_model_dir, versions
from napari_retina.widgets.train import MODELS, TrainWidget, read_log
from napari_retina.widgets.viewer_session import session_of

TINY = "--samples-per-epoch 8 --patch-size 32 --scale 1.0 --base-channels 4 --depth 2 --val-images IDRiD_03.png"


@pytest.fixture
def ex_folder(tmp_path):
    """Three flat-layout images, each with a few bright exudate blobs and their masks."""
    return write_exudate_folder(tmp_path / "ex")


def open_in_session(viewer, folder, index=0):
    """What opening `folder` in the viewer gives the session (the annotator dock or File > Open do this)."""
    from napari_retina.io.datasets import open_dataset
    from napari_retina.session import open_record

    ds = open_dataset(folder)
    session = session_of(viewer)
    session.set_opened(open_record(ds.records[index], dataset=ds), ds, index)
    return session


def plugin_dock(viewer):
    """The Retrain dock as the Plugins menu opens it (napari hands it a proxy of the viewer)."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-retina", "Retrain models")
    return widget


@pytest.fixture
def docks(make_napari_viewer, qtbot, ex_folder):
    viewer = make_napari_viewer()
    session = open_in_session(viewer, ex_folder)
    train = plugin_dock(viewer)
    heard = []  # what the session's model listeners hear (the refiner and finders listen the same way)
    session.connect("model", lambda kind, folder: heard.append((kind, folder)))
    train.heard = heard
    yield viewer, session, train
    if train.process is not None:
        train.process.kill()
        train.process.waitForFinished(5000)


def _form(train, epochs):
    train.model_combo.setCurrentText("hard-exudate segmenter")
    train.start_combo.setCurrentText("scratch")
    train.device_combo.setCurrentText("cpu")
    train.epochs_spin.setValue(epochs)
    train.batch_spin.setValue(4)
    train.extra_edit.setText(TINY)


def test_train_in_a_separate_process_watch_the_plot_and_swap_the_new_version_in(docks, qtbot, ex_folder):
    viewer, session, train = docks
    assert train.data_edit.text() == str(ex_folder)  # the folder open in the session
    assert "hard-exudate segmenter" in MODELS and train.device_combo.findText("cpu") >= 0
    _form(train, epochs=2)
    shipped = current_model_dir("exudates")
    qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
    assert train.process is not None and not train.start_button.isEnabled()
    bar = []  # napari's progress bar: the values it was given, epoch by epoch
    train._pbar.events.value.connect(lambda e: bar.append(e.value))
    ticks = []
    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(50)
    seen = []  # the status lines while it runs
    train._poll.timeout.connect(lambda: seen.append(train.status.text()))
    qtbot.waitUntil(lambda: train.process is None, timeout=180000)
    timer.stop()
    assert len(ticks) > 5  # the GUI is not blocked while the training process runs
    assert bar and bar == sorted(bar) and 0 < bar[-1] <= 99  # in percent, never backwards
    # from the first step on, the status line has an ETA (replayed from the run's own events: a
    # run this small can end between two polls of the log)
    events = list(train.events)
    first_step = next(i for i, e in enumerate(events) if e.get("event") == "step")
    train.events = events[: first_step + 1]
    line, _ = train.progress_line()
    train.events = events
    assert "ETA" in line and "batch" in line, (line, seen)
    xs, ys = train.loss_curve.getData()
    assert list(xs) == [1, 2] and np.isfinite(ys).all()  # the live plot: one point per epoch
    assert len(train.val_curve.getData()[0]) == 2
    assert "new exudates version" in train.result.text() and "in use" in train.result.text(), train.result.text()
    out = train.out
    # the run's last status line: its result and that it is not in use; no stale epoch or ETA
    status = train.status.text()
    assert status.startswith("training ended") and out.name in status and "not in use" in status, status
    assert "ETA" not in status
    assert (out / "config.json").is_file() and any(v.folder == out for v in versions("exudates"))
    # both versions scored on the new one's validation images by napari-retina evaluate, in the background
    qtbot.mouseClick(train.compare_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: train.compare_label.text().startswith("on the same"), timeout=120000)
    text = train.compare_label.text()
    assert "on the same 1 validation images" in text and text.count("AUPR") == 2, text
    qtbot.mouseClick(train.use_button, Qt.MouseButton.LeftButton)
    assert current_model_dir("exudates") == out.resolve() != shipped
    assert session.model_dir("exudates") == out.resolve()
    assert train.heard == [("exudates", out.resolve())]  # every live model of the kind hears it
    assert "now in use" in train.status.text()
    from napari_retina.segmentation import load_segmenter

    assert load_segmenter("EX").version == out.name
    # the previous version stays and can be chosen again
    train._refresh_versions()
    row = [i for i, v in enumerate(train._versions) if v.shipped][0]
    train.version_list.setCurrentRow(row)
    qtbot.mouseClick(train.select_button, Qt.MouseButton.LeftButton)
    assert current_model_dir("exudates") == shipped


def test_cancel_stops_the_process_and_keeps_the_best_epoch(docks, qtbot):
    viewer, session, train = docks
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
    viewer, session, train = docks
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

    viewer, session, train = docks
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
    viewer, session, train = docks
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


def test_an_imported_model_is_put_in_use_through_the_session(docks, qtbot, tmp_path, monkeypatch):
    viewer, session, train = docks
    notes = []
    monkeypatch.setattr(train_module, "show_info", notes.append)
    mine = model_copy("refiner", tmp_path / "refiner-mine", "2026.12.02-mine")  # as good as the one in use
    train.model_combo.setCurrentText("ellipse refiner")
    imported = train.import_model(mine)  # imported, so put in use
    assert imported is not None and current_model_dir("refiner") == imported.resolve()
    assert train.heard == [("refiner", imported.resolve())] and session.model_dir("refiner") == imported.resolve()
    assert "refiner: now using 2026.12.02-mine" in notes  # the notification names the version
    assert "2026.12.02-mine" in train.status.text()
    in_use = [train.version_list.item(i).text() for i in range(train.version_list.count())
              if train.version_list.item(i).text().startswith("in use: ")]
    assert in_use == ["in use: 2026.12.02-mine: " + in_use[0].split(": ", 2)[2]]


REFINER_TINY = "--patch-size 64 --samples-per-epoch 8 --base-channels 4 --reduction 1.0 --val-images IDRiD_03.png"


def test_ticked_models_train_one_after_the_other_each_with_its_own_options(docks, qtbot, monkeypatch):
    viewer, session, train = docks
    monkeypatch.setattr(train_module, "confirm_use", lambda parent, text: True)  # tiny models: use them anyway
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
    assert train.heard == [("exudates", outs[0].resolve()), ("refiner", outs[1].resolve())]


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

    viewer, session, train = docks
    _form(train, epochs=2)
    monkeypatch.setattr(sys, "executable", str(train.data_edit.text()) + "/no-python-here")
    train.start()
    qtbot.waitUntil(lambda: train.process is None, timeout=10000)
    assert train._pbar is None and train._slowed is None and train.start_button.isEnabled()
    assert "no model" in train.status.text()


# ---- bound to the session; choosing a version; the truths of a run -------------------------------------------


def model_copy(kind, dest, version, figure=None, validated=True):
    """A copy of the shipped `kind` model (weights and their checksum as shipped) under another
    version, with its headline validation figure set to `figure` (on the shipped one's images)."""
    from napari_retina.models.registry import shipped_model_dir

    shutil.copytree(shipped_model_dir(kind), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["version"] = version
    key = {"exudates": "val_aupr_working_scale", "refiner": "val_image_iou"}[kind]
    if figure is not None:
        cfg["training"][key] = figure
    if not validated:
        cfg["training"] = {k: v for k, v in cfg["training"].items() if "val" not in k}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_the_dock_opened_from_the_plugins_menu_shows_the_sessions_folder_and_follows_it(
        make_napari_viewer, qtbot, ex_folder, tmp_path):
    viewer = make_napari_viewer()
    train = plugin_dock(viewer)  # opened before anything is open: empty, then it follows the session
    assert train.data_edit.text() == "" and train.session is session_of(viewer)
    open_in_session(viewer, ex_folder)
    assert train.data_edit.text() == str(ex_folder)
    other = write_exudate_folder(tmp_path / "other")
    open_in_session(viewer, other)  # the grader opens another folder
    assert train.data_edit.text() == str(other)
    train.data_edit.setText(str(ex_folder))  # typed by hand: kept when the session moves on
    open_in_session(viewer, other, index=1)
    assert train.data_edit.text() == str(ex_folder)
    import inspect

    source = inspect.getsource(train_module)  # bound to the session, never to the annotator dock
    assert "from .annotator" not in source and "annotator_of" not in source


def test_a_worse_or_unvalidated_version_asks_first_with_both_figures(docks, qtbot, tmp_path, monkeypatch):
    viewer, session, train = docks
    notes, asked = [], []
    monkeypatch.setattr(train_module, "show_info", notes.append)
    shipped = session.model_dir("exudates")
    in_use = json.loads((shipped / "config.json").read_text())["training"]["val_aupr_working_scale"]
    worse = model_copy("exudates", tmp_path / "worse", "2026.12.09-worse", figure=round(in_use - 0.2, 4))
    better = model_copy("exudates", tmp_path / "better", "2026.12.09-better", figure=round(in_use + 0.01, 4))
    never = model_copy("exudates", tmp_path / "never", "2026.12.09-never", validated=False)
    train.model_combo.setCurrentText("hard-exudate segmenter")

    answer = False
    monkeypatch.setattr(train_module, "confirm_use", lambda parent, text: (asked.append(text), answer)[1])
    assert train.import_model(worse) is not None
    (question,) = asked
    assert "2026.12.09-worse" in question and f"{in_use - 0.2:.4g}" in question and f"{in_use:.4g}" in question
    assert session.model_dir("exudates") == shipped and train.heard == []  # "No": the version in use stays
    assert "not in use" in notes[-1]
    answer = True
    row = [i for i, v in enumerate(train._versions) if v.version == "2026.12.09-worse"][0]
    train.version_list.setCurrentRow(row)
    qtbot.mouseClick(train.select_button, Qt.MouseButton.LeftButton)  # "Use selected", and "Yes"
    assert len(asked) == 2 and session.model_dir("exudates").name == "2026.12.09-worse"
    assert train.heard[-1][0] == "exudates" and train.heard[-1][1].name == "2026.12.09-worse"
    assert "exudates: now using 2026.12.09-worse" in notes
    # a better one goes in use without a word; one that never validated asks, whatever the figures
    assert train.import_model(better) is not None and len(asked) == 2
    assert session.model_dir("exudates").name == "2026.12.09-better"
    answer = False
    assert train.import_model(never) is not None and len(asked) == 3 and "never validated" in asked[-1]
    assert session.model_dir("exudates").name == "2026.12.09-better"


def _one_image_folder(tmp_path):
    from PIL import Image

    from conftest import blob_mask, fundus_rgb, write_palette_mask

    d = tmp_path / "one"
    d.mkdir()
    Image.fromarray(fundus_rgb(1)).save(d / "IDRiD_01.png")
    write_palette_mask(d / "IDRiD_01_EX.tif", blob_mask([(30, 40)], radius=3))
    return d


def test_too_little_labelled_data_is_advice_in_the_dock_and_leaves_no_version_folder(docks, qtbot, tmp_path):
    viewer, session, train = docks
    _form(train, epochs=1)
    train.extra_edit.setText("--samples-per-epoch 8 --patch-size 32 --scale 1.0 --base-channels 4 --depth 2")
    train.data_edit.setText(str(_one_image_folder(tmp_path)))
    before = {v.folder for v in versions("exudates")}
    train.start()
    out = train.out
    qtbot.waitUntil(lambda: train.process is None, timeout=120000)
    status = train.status.text()
    assert "only IDRiD_01.png has a label for EX" in status and "tick *reviewed*" in status, status
    assert "IDRiD-layout folder" in status and "Traceback" not in status
    assert not out.exists() and {v.folder for v in versions("exudates")} == before
    assert not train.use_button.isEnabled()


def test_closing_the_window_while_training_stops_it_quietly_and_leaves_no_empty_version(
        make_napari_viewer, qtbot, ex_folder):
    viewer = make_napari_viewer()
    open_in_session(viewer, ex_folder)
    train = plugin_dock(viewer)
    _form(train, epochs=200)
    train.start()
    proc, out = train.process, train.out
    pid = proc.processId()
    qtbot.waitUntil(lambda: (out / "run" / "log.jsonl").is_file(), timeout=60000)  # preparing its data
    viewer.close()  # an exception in a slot here would fail the test (pytest-qt)
    qtbot.wait(500)
    import os

    def gone():
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] == "Z"  # a zombie has ended
        except (ProcessLookupError, FileNotFoundError):
            return True

    qtbot.waitUntil(gone, timeout=10000)
    if not any((out / "run" / "checkpoints").glob("*.pt")):
        assert not out.exists()  # no model and no checkpoint: no version folder


def test_the_result_and_its_buttons_show_without_scrolling_in_a_1600x1000_window(
        make_napari_viewer, qtbot, ex_folder):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    open_in_session(viewer, ex_folder)
    train = plugin_dock(viewer)
    _form(train, epochs=1)
    train.start()
    qtbot.waitUntil(lambda: train.process is None, timeout=180000)
    qtbot.wait(200)
    assert train.use_button.isEnabled() and train.result.text()
    viewport = train._scroll.viewport()
    assert train._scroll.verticalScrollBar().value() == 0
    for w in (train.status, train.result, train.use_button, train.compare_button):
        bottom = w.mapTo(train._content, w.rect().bottomLeft()).y()
        assert w.isVisible() and bottom < viewport.height(), (type(w).__name__, bottom, viewport.height())


def test_cancelled_before_its_first_checkpoint_a_run_leaves_no_version_folder(docks, qtbot):
    viewer, session, train = docks
    _form(train, epochs=200)
    before = {v.folder for v in versions("exudates")}
    qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
    out = train.out
    qtbot.mouseClick(train.cancel_button, Qt.MouseButton.LeftButton)  # at once: long before a checkpoint
    qtbot.waitUntil(lambda: train.process is None, timeout=60000)
    assert "cancelled before its first checkpoint" in train.status.text(), train.status.text()
    assert not out.exists() and {v.folder for v in versions("exudates")} == before
    assert not train.use_button.isEnabled() and train.start_button.isEnabled()
