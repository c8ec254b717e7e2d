"""Retrain a model from the graders' corrected labels, from napari, and swap the new version in.

The dock builds a `python -m training <model> ...` command line from its form (data: the folder
open now, plus optionally an IDRiD training folder; start from the version in use or from
scratch; device; epochs or minutes; batch size; any further recipe options) and runs it in its
own process (QProcess), so the GUI stays responsive and Cancel is clean: the trainer stops at the
end of the current step on SIGTERM, validates and keeps the best epoch in the new version's
folder. While it runs, the JSON-lines log is read once a second: napari's progress bar with an
ETA, a live plot of the training loss and the validation figure (pyqtgraph), device and
throughput. When it ends: the new version's validation figure beside the one in use (both from
the same held-out images, named in the cards), and "Use this model" selects it for the
annotator and the segmenters at once (`models.versions`); the previous version stays listed.
"Import model..." adds a folder trained elsewhere (checksum checked).
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import napari
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QProcess, QProcessEnvironment, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem,
    QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from .activity import SlowAnimations, move_bar

# what the form offers: label -> (recipe, model kind, fixed recipe options)
MODELS = {
    "ellipse refiner": ("refiner", "refiner", []),
    "hard-exudate segmenter": ("exudates", "exudates", []),
    "microaneurysm HGN, full scale": ("ma-hgn", "ma-hgn", ["--scale", "1.0"]),
    "microaneurysm HGN, half scale": ("ma-hgn", "ma-hgn", ["--scale", "0.5"]),
    "microaneurysm PRN": ("ma-prn", "ma-prn", []),
}
MONITOR_NAMES = {"val_iou": "validation IoU %", "val_aupr": "validation AUPR"}
# options the main form sets (or that make no sense from the dock); the rest come from the recipe
FORM_OPTIONS = {"data", "out", "init", "resume", "run_dir", "epochs", "minutes", "batch_size", "device", "version",
                "quiet", "workers"}
EVALUATE = {"exudates": "ex", "refiner": "refine"}  # kinds `napari-retina evaluate` scores on their own
LESIONS_OF = {"refiner": ["MA", "SE", "EX", "HE"], "exudates": ["EX"], "ma-hgn": ["MA"], "ma-prn": ["MA"]}


def cuda_devices() -> list[str]:
    """CUDA devices torch sees here (none when torch is missing or CPU-only)."""
    try:
        import torch

        return [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return []


def read_log(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """New JSON-lines events of a training log from byte `offset`; (events, new offset). A half-written line waits."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    events, used = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        used += len(line)
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + used


class TrainWidget(QWidget):
    """Dock: choose data and a model, train in a separate process, watch it, use the result."""

    bundle_written = Signal(object)  # the summary of a training bundle, once written

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.out: Path | None = None
        self.kind: str | None = None
        self.events: list[dict] = []
        self._offset = 0
        self._pbar = None
        self._slowed = None  # activity.SlowAnimations held while training runs
        self._started_at = 0.0
        self._cancelled = False
        self._queue: list[str] = []  # models still to train in this run, one after the other
        self._done_runs: list[tuple[str, Path, str]] = []  # (kind, folder, summary line) of this run
        self._options_text: dict[str, str] = {}  # each model's "options" line, kept while another is shown
        self._shown = ""
        self._poll = QTimer(self)
        self._poll.setInterval(1000)
        self._poll.timeout.connect(self.poll)
        self._build()
        self._refresh_versions()
        self._load_options()

    # --- form ------------------------------------------------------------------------------------
    def _build(self) -> None:
        from ._scroll import scrolling_layout

        lay, _, _ = scrolling_layout(self)  # squeezed, the wrapped lines would be cut
        form_box = QGroupBox("Retrain")
        form = QFormLayout(form_box)
        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODELS))
        self.model_combo.currentIndexChanged.connect(self._refresh_versions)
        self.model_combo.currentIndexChanged.connect(self._load_options)
        self.model_combo.currentIndexChanged.connect(self._swap_options_text)
        self._shown = self.model_combo.currentText()
        form.addRow("model", self.model_combo)
        self.queue_list = QListWidget()
        self.queue_list.setToolTip("trained one after the other once the model above is done, each with the "
                                   "same data, device and budget and its own options line")
        for label in MODELS:
            item = QListWidgetItem(label)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked)
            self.queue_list.addItem(item)
        self.queue_list.setMaximumHeight(5 * self.queue_list.sizeHintForRow(0) + 6)
        form.addRow("then train", self.queue_list)
        self._mark_shown_in_queue()
        self.data_edit = QLineEdit(self._default_data())
        self.data_edit.setToolTip("folders of corrected images (projects beside them count where reviewed)")
        browse = QPushButton("...")
        browse.setMaximumWidth(32)
        browse.clicked.connect(lambda: self._browse(self.data_edit))
        row = QHBoxLayout()
        row.addWidget(self.data_edit)
        row.addWidget(browse)
        form.addRow("data", row)
        self.idrid_edit = QLineEdit("")
        self.idrid_edit.setPlaceholderText("optional: an IDRiD training folder too")
        form.addRow("and", self.idrid_edit)
        self.start_combo = QComboBox()
        self.start_combo.addItems(["the version in use", "scratch"])
        form.addRow("start from", self.start_combo)
        self.device_combo = QComboBox()
        gpus = cuda_devices()
        self.device_combo.addItems([g.split(" ")[0] for g in gpus] + ["cpu"])
        self._gpus = gpus
        self.device_label = QLabel("")
        self.device_label.setWordWrap(True)
        form.addRow("device", self.device_combo)
        form.addRow(self.device_label)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(0, 1000)
        self.epochs_spin.setSpecialValueText("no limit")
        self.epochs_spin.setValue(10)
        self.minutes_spin = QSpinBox()
        self.minutes_spin.setRange(0, 10000)
        self.minutes_spin.setSpecialValueText("no limit")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(8)
        form.addRow("epochs", self.epochs_spin)
        form.addRow("minutes", self.minutes_spin)
        form.addRow("batch size", self.batch_spin)
        self.extra_edit = QLineEdit("")
        self.extra_edit.setPlaceholderText("further options as typed on the command line")
        form.addRow("options", self.extra_edit)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("continue the cancelled run from its last checkpoint")
        self.resume_button.setEnabled(False)
        self.resume_button.clicked.connect(self.resume)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)
        form.addRow(buttons)
        self.elsewhere_button = QPushButton("Train elsewhere...")
        self.elsewhere_button.setToolTip("write the labels and the exact command into a folder for a GPU server")
        self.elsewhere_button.clicked.connect(self._choose_bundle)
        form.addRow(self.elsewhere_button)
        lay.addWidget(form_box)
        # the recipe's own options, built from its one declaration (`python -m training M --describe-options`)
        self.options_box = QGroupBox("Recipe options")
        self.options_box.setCheckable(True)
        self.options_box.setChecked(False)  # folded: the defaults are the recipe's
        self.options_layout = QVBoxLayout(self.options_box)
        self.options_form = None  # a magicgui Container, built per recipe
        self.option_widgets: dict[str, tuple[dict, object]] = {}
        self._described: dict[str, list[dict]] = {}
        self.options_box.toggled.connect(self._show_options)
        lay.addWidget(self.options_box)

        run_box = QGroupBox("Progress")
        rl = QVBoxLayout(run_box)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        rl.addWidget(self.status)
        import pyqtgraph as pg

        self.plot = pg.PlotWidget()
        self.plot.setMinimumHeight(160)
        self.plot.setMaximumHeight(230)
        self.plot.addLegend()
        self.plot.setLabel("bottom", "epoch")
        self.loss_curve = self.plot.plot([], [], pen=pg.mkPen("#f0a030", width=2), symbol="o", symbolSize=5,
                                         name="training loss")
        self.val_curve = self.plot.plot([], [], pen=pg.mkPen("#40c0f0", width=2), symbol="o", symbolSize=5,
                                        name="validation figure (0-1)")
        rl.addWidget(self.plot)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        rl.addWidget(self.result)
        self.compare_button = QPushButton("Compare on the same images")
        self.compare_button.setToolTip("score the version in use and the new one on the new one's validation "
                                       "images, at full resolution (napari-retina evaluate; takes minutes)")
        self.compare_button.setEnabled(False)
        self.compare_button.clicked.connect(self.compare)
        self.use_button = QPushButton("Use this model")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self.use_new)
        rl.addWidget(self.compare_button)
        rl.addWidget(self.use_button)
        self.compare_label = QLabel("")
        self.compare_label.setWordWrap(True)
        rl.addWidget(self.compare_label)
        lay.addWidget(run_box)

        ver_box = QGroupBox("Versions")
        vl = QVBoxLayout(ver_box)
        self.version_list = QListWidget()
        self.version_list.setMaximumHeight(110)
        vl.addWidget(self.version_list)
        vrow = QHBoxLayout()
        self.select_button = QPushButton("Use selected")
        self.select_button.clicked.connect(self.use_selected)
        self.import_button = QPushButton("Import model...")
        self.import_button.clicked.connect(self._choose_import)
        vrow.addWidget(self.select_button)
        vrow.addWidget(self.import_button)
        vl.addLayout(vrow)
        lay.addWidget(ver_box)
        lay.addStretch(1)

    def _default_data(self) -> str:
        ann = _annotator_of(self.viewer)
        if ann is not None and ann.dataset is not None:
            return str(ann.dataset.root)
        return ""

    def _browse(self, edit: QLineEdit) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of images and annotation projects")
        if d:
            edit.setText(d)

    @property
    def choice(self) -> tuple[str, str, list[str]]:
        return MODELS[self.model_combo.currentText()]

    def _swap_options_text(self) -> None:
        """Each model keeps its own "options" line (recipes take different options)."""
        self._options_text[self._shown] = self.extra_edit.text()
        self._shown = self.model_combo.currentText()
        self.extra_edit.setText(self._options_text.get(self._shown, ""))
        self._mark_shown_in_queue()

    def _mark_shown_in_queue(self) -> None:
        """The model shown above trains first: its line in "then train" is greyed out."""
        for i in range(self.queue_list.count()):
            item = self.queue_list.item(i)
            enabled = item.text() != self.model_combo.currentText()
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEnabled if enabled else item.flags() & ~Qt.ItemFlag.ItemIsEnabled)

    def queued(self) -> list[str]:
        """The models ticked under "then train", in the list's order, without the one shown."""
        items = (self.queue_list.item(i) for i in range(self.queue_list.count()))
        return [it.text() for it in items
                if it.checkState() == Qt.CheckState.Checked and it.text() != self.model_combo.currentText()]

    # --- the recipe's options -------------------------------------------------------------------------
    def _load_options(self) -> None:
        """Ask the recipe for its options (`--describe-options`, a short process) and build their
        form when the answer comes.

        The process belongs to the application, not to this dock: a dock closed while it runs
        would otherwise destroy it from inside its own destructor, whose `finished` signal then
        reached a half-deleted widget (a crash at exit)."""
        from qtpy.QtCore import QCoreApplication

        recipe = self.choice[0]
        if recipe in self._described:
            self._build_options(recipe, self._described[recipe])
            return
        proc = QProcess(QCoreApplication.instance())
        env = QProcessEnvironment()
        for k, v in _training_env().items():
            env.insert(k, v)
        proc.setProcessEnvironment(env)

        def done(code, _status=None, proc=proc, recipe=recipe):
            out = bytes(proc.readAllStandardOutput()).decode(errors="replace")
            err = bytes(proc.readAllStandardError()).decode(errors="replace").strip().splitlines()
            proc.deleteLater()
            try:
                try:
                    if code != 0:
                        raise ValueError((err or ["python -m training failed"])[-1])
                    options = json.loads(out)
                except ValueError as e:
                    self.options_box.setTitle(f"Recipe options: unavailable ({e})")
                    return
                self._build_options(recipe, options)
            except RuntimeError:  # the dock was closed meanwhile
                return

        proc.finished.connect(done)
        proc.start(sys.executable, ["-m", "training", recipe, "--describe-options"])

    def _build_options(self, recipe: str, options: list[dict]) -> None:
        """A magicgui form of the recipe's options: a typed widget per option, its default shown."""
        from magicgui.widgets import Container, create_widget

        self._described[recipe] = options
        if recipe != self.choice[0]:
            return  # the model changed meanwhile
        if self.options_form is not None:
            self.options_layout.removeWidget(self.options_form.native)
            self.options_form.native.deleteLater()
        self.option_widgets = {}
        fixed = {a for a in self.choice[2] if a.startswith("--")}
        widgets = []
        for opt in options:
            if opt["dest"] in FORM_OPTIONS or opt["flag"] in fixed:
                continue
            d, name, label = opt["default"], opt["dest"], opt["flag"].lstrip("-")
            if opt["kind"] == "flag":
                w = create_widget(value=bool(d), annotation=bool, name=name, label=label)
            elif opt["kind"] == "choice":
                w = create_widget(value=str(d), name=name, label=label,
                                  options={"choices": [str(c) for c in opt["choices"]]})
            elif opt["kind"] == "int" and isinstance(d, int):
                w = create_widget(value=d, annotation=int, name=name, label=label,
                                  options={"min": -(10**9), "max": 10**9})
            else:  # floats stay text: a spin box would round 1e-4 away
                text = "" if d is None else " ".join(map(str, d)) if isinstance(d, list) else str(d)
                w = create_widget(value=text, annotation=str, name=name, label=label)
            w.tooltip = opt["help"]
            self.option_widgets[opt["flag"]] = (opt, w)
            widgets.append(w)
        self.options_form = Container(widgets=widgets, labels=True)
        self.options_layout.addWidget(self.options_form.native)
        self.options_box.setTitle(f"Recipe options ({recipe}, {len(self.option_widgets)})")
        self._show_options(self.options_box.isChecked())

    def _show_options(self, on: bool) -> None:
        if self.options_form is not None:
            self.options_form.native.setVisible(on)

    def option_args(self) -> list[str]:
        """The recipe options whose value differs from the recipe's default, as command-line arguments."""
        args: list[str] = []
        for flag, (opt, w) in self.option_widgets.items():
            d = opt["default"]
            if opt["kind"] == "flag":
                if bool(w.value) != bool(d):
                    args.append(flag)
                continue
            text = str(w.value).strip()
            default = "" if d is None else " ".join(map(str, d)) if isinstance(d, list) else str(d)
            if text == default or not text:
                continue
            if opt["kind"] in ("int", "float"):
                try:
                    (int if opt["kind"] == "int" else float)(text)
                except ValueError:
                    raise ValueError(f"{flag}: {text!r} is not a number") from None
            args += [flag, *text.split()] if opt["kind"] == "list" else [flag, text]
        return args

    # --- versions ----------------------------------------------------------------------------------
    def _cost_line(self, kind: str) -> str:
        """The device line: the CUDA devices, or what the version in use cost to train and where."""
        if self._gpus:
            return f"{len(self._gpus)} CUDA device(s): {', '.join(self._gpus)}"
        from ..models.versions import current_model_dir

        try:
            t = json.loads((current_model_dir(kind) / "config.json").read_text()).get("training", {})
            cost = (f" (the version in use took {float(t['minutes']):.0f} min for {t['epochs']} epochs on "
                    f"{t.get('device', '?')})")
        except (OSError, ValueError, KeyError, TypeError):
            cost = ""
        return (f"no CUDA device here: training runs on the CPU{cost}; Train elsewhere if a GPU server "
                "is at hand")

    def _refresh_versions(self) -> None:
        from ..models.versions import current_model_dir, versions

        _, kind, _ = self.choice
        self.device_label.setText(self._cost_line(kind))
        self.version_list.clear()
        self._versions = versions(kind)
        current = current_model_dir(kind).resolve()
        for v in self._versions:
            mark = "in use: " if v.folder.resolve() == current else ""
            self.version_list.addItem(mark + v.label)

    def use_selected(self) -> None:
        row = self.version_list.currentRow()
        if 0 <= row < len(self._versions):
            self._use(self._versions[row].kind, self._versions[row].folder)

    def _use(self, kind: str, folder: Path) -> None:
        from ..models.versions import select

        try:
            select(kind, folder)
        except Exception as e:  # noqa: BLE001 - one line for a refused folder
            show_error(str(e).splitlines()[0])
            return
        ann = _annotator_of(self.viewer)
        if ann is not None:
            ann.reload_models()
        self._refresh_versions()
        show_info(f"{kind}: now using {folder.name}")

    def _choose_import(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Model folder trained elsewhere")
        if d:
            self.import_model(d)

    def import_model(self, folder: str | Path) -> Path | None:
        from ..models.versions import import_model

        try:
            target = import_model(folder)
        except Exception as e:  # noqa: BLE001 - the registry's one line
            show_error(f"import model: {str(e).splitlines()[0]}")
            return None
        kind = json.loads((target / "config.json").read_text())["model"]
        self._use(kind, target)  # an imported model is imported to be used; the previous version stays
        show_info(f"imported {target.name} and put it in use")
        return target

    # --- running ------------------------------------------------------------------------------------
    def command(self, label: str | None = None) -> tuple[list[str], Path, str]:
        """(the `python -m training ...` arguments the form describes, the new version's folder, its kind).

        `label`: a queued model instead of the one shown: the same data, device and budget, its
        own options line, its recipe's defaults for the rest.
        """
        from ..models.versions import current_model_dir, new_version_dir

        shown = label is None or label == self.model_combo.currentText()
        label = self.model_combo.currentText() if label is None else label
        recipe, kind, fixed = MODELS[label]
        data = [d for d in (self.data_edit.text().strip(), self.idrid_edit.text().strip()) if d]
        if shown:  # ValueError: before anything changes
            options = self.option_args() + shlex.split(self.extra_edit.text())
        else:
            options = shlex.split(self._options_text.get(label, ""))
        version = datetime.datetime.now().strftime(f"%Y.%m.%d-%H%M-{recipe}")
        out = new_version_dir(kind, version)
        args = ["-m", "training", recipe, "--data", *data, "--out", str(out), "--version", out.name,
                "--device", self.device_combo.currentText(), "--batch-size", str(self.batch_spin.value()), *fixed,
                *self._budget()]
        current = current_model_dir(kind)
        if self.start_combo.currentIndex() == 0 and (current / "config.json").is_file() and _same_scale(current, fixed):
            args += ["--init", str(current)]
        return args + options, out, kind

    def _budget(self) -> list[str]:
        """--epochs and/or --minutes (whichever ends first); ValueError when both say "no limit"."""
        out = []
        if self.epochs_spin.value():
            out += ["--epochs", str(self.epochs_spin.value())]
        if self.minutes_spin.value():
            out += ["--minutes", str(self.minutes_spin.value())]
        if not out:
            raise ValueError("give a number of epochs or minutes (both say no limit)")
        return out

    def start(self) -> None:
        if self.process is not None:
            return
        data = [d for d in (self.data_edit.text().strip(), self.idrid_edit.text().strip()) if d]
        missing = [d for d in data if not Path(d).is_dir()]
        if not data or missing:
            show_error(f"retrain: {'choose a data folder' if not data else missing[0] + ': not a folder'}")
            return
        try:
            for label in self.queued():
                shlex.split(self._options_text.get(label, ""))
            args, out, kind = self.command()
        except ValueError as e:
            show_error(f"retrain: options: {e}")
            return
        self._queue, self._done_runs = self.queued(), []
        self.out, self.kind = out, kind
        self._run(args)

    def _start_next(self) -> None:
        """The next model of the queue, or nothing left."""
        label = self._queue.pop(0)
        try:
            args, out, kind = self.command(label)
        except ValueError as e:
            show_error(f"retrain {label}: options: {e}")
            self._queue = []
            return
        self.out, self.kind = out, kind
        self._run(args)
        self.status.setText(f"{label}: " + self.status.text())

    def resume(self) -> None:
        """The cancelled run again, from its last checkpoint (same folder, same options)."""
        if self.process is None and getattr(self, "_last_args", None):
            self._run([*self._last_args, "--resume"] if "--resume" not in self._last_args else self._last_args,
                      fresh=False)

    def _run(self, args: list[str], fresh: bool = True) -> None:
        self._last_args = args
        self.resume_button.setEnabled(False)
        self.compare_button.setEnabled(False)
        self.compare_label.setText("")
        if fresh:
            self.events, self._offset = [], 0
            self.loss_curve.setData([], [])
            self.val_curve.setData([], [])
        self._cancelled = False
        self.result.setText("")
        self.use_button.setEnabled(False)
        proc = QProcess(self)
        env = QProcessEnvironment()
        for k, v in _training_env().items():
            env.insert(k, v)
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        proc.readyReadStandardOutput.connect(self._on_output)
        proc.finished.connect(self._on_finished)
        # a process that never starts sends no finished(): end the run the same way (bar closed, buttons back)
        proc.errorOccurred.connect(lambda err: self._on_finished(-1) if (
            err == QProcess.ProcessError.FailedToStart and self.process is proc) else None)
        self._output = ""
        self.process = proc
        if self._pbar is None:
            from napari.utils import progress

            # made before the process starts: napari processes pending events while it makes a
            # bar, and the process's end must find it. 0: until the log gives the epochs
            self._pbar = progress(total=0, desc=f"training {self.kind}")
        if self._slowed is None:
            self._slowed = SlowAnimations(self.viewer)  # for hours it would slow the training
        self._started_at = time.monotonic()
        proc.start(sys.executable, args)
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("starting: " + " ".join(["python"] + args))
        self._poll.start()

    def cancel(self) -> None:
        if self.process is not None:
            self._cancelled = True
            self.status.setText("cancelling: the current step finishes, the best epoch so far is kept...")
            self.process.terminate()  # SIGTERM: the trainer stops cleanly at the end of the step

    def _on_output(self) -> None:
        if self.process is not None:
            self._output = (self._output + bytes(self.process.readAllStandardOutput()).decode(errors="replace"))[-4000:]

    def poll(self) -> None:
        """Read what the log gained since the last call; update plot, progress and status."""
        if self.out is None:
            return
        events, self._offset = read_log(self.out / "run" / "log.jsonl", self._offset)
        if not events:
            return
        self.events += events
        start = next((e for e in self.events if e.get("event") == "start"), {})
        epochs = [e for e in self.events if e.get("event") == "epoch"]
        monitor = start.get("monitor", "val_loss")
        total = start.get("epochs") or self.epochs_spin.value()
        first = int(start.get("start_epoch", 1))
        if epochs:
            xs = [e["epoch"] for e in epochs]
            self.loss_curve.setData(xs, [e.get("train_loss", float("nan")) for e in epochs])
            vals = [float(e.get(monitor, float("nan"))) for e in epochs]
            scale = 100.0 if monitor == "val_iou" else 1.0
            self.val_curve.setData(xs, [v / scale for v in vals])
        done = len(epochs)
        last = epochs[-1] if epochs else None
        step = next((e for e in reversed(self.events) if e.get("event") == "step"), None)
        parts = [f"device {start.get('device', '?')}"]
        if last:
            per_epoch = (time.monotonic() - self._started_at) / max(done, 1)
            left = max(0, total - first + 1 - done) * per_epoch
            name = MONITOR_NAMES.get(monitor, monitor)
            parts += [f"epoch {last['epoch']} of {total}", f"{name} {float(last.get(monitor, float('nan'))):.3g}"
                      f" (best {float(last.get('best', float('nan'))):.3g})",
                      f"{float(last.get('samples_per_s', 0)):.1f} samples/s", f"ETA {left / 60:.0f} min"]
        elif step:
            parts += [f"epoch {step['epoch']}: batch {step['batch']} of {step['batches']}"]
        self.status.setText(", ".join(parts))
        if self._pbar is not None:  # last: it may run the process's end, whose status line stays
            move_bar(self._pbar, done, max(1, total - first + 1))

    def _on_finished(self, code: int, _status=None) -> None:
        self.poll()
        self._poll.stop()
        proc, self.process = self.process, None
        if proc is not None:
            self._on_output()
            proc.deleteLater()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._slowed is not None:
            self._slowed.release()
            self._slowed = None
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self._refresh_versions()
        new = self._figure(self.out) if self.out is not None else None
        if new is None:
            tail = self._output.strip().splitlines()[-1:] or ["no model was written"]
            dropped = f"; not started: {', '.join(self._queue)}" if self._queue else ""
            self._queue = []
            self.status.setText(f"training ended (exit {code}) without a model: {tail[0]}{dropped}")
            return
        from ..models.versions import current_model_dir

        cur = self._figure(current_model_dir(self.kind))
        verb = "cancelled; kept" if self._cancelled else "done:"
        self.resume_button.setEnabled(self._cancelled)
        self._done_runs.append((self.kind, self.out, f"{verb} new {self.kind} version {self.out.name}: {new}"
                                f"   |   in use: {cur or 'none'}"))
        self.result.setText("\n".join(line for _, _, line in self._done_runs)
                            + "\n(figures of training: their validation images may differ)")
        self.use_button.setText("Use this model" if len(self._done_runs) == 1 else
                                f"Use these {len(self._done_runs)} models")
        self.use_button.setEnabled(True)
        if self._queue and not self._cancelled:
            QTimer.singleShot(0, self._start_next)
        elif self._queue:
            self.status.setText(self.status.text() + f"; not started: {', '.join(self._queue)}")
            self._queue = []
        self.compare_button.setEnabled(self.kind in EVALUATE)
        self.compare_label.setText("" if self.kind in EVALUATE else
                                   "assemble the microaneurysm networks (python -m training microaneurysms) "
                                   "to compare detectors with napari-retina evaluate ma")

    # --- train elsewhere ---------------------------------------------------------------------------
    def _choose_bundle(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "An empty folder for the training bundle")
        if d:
            self.write_bundle(d)

    def write_bundle(self, folder: str | Path):
        """Write the labels of the data folders and this form's command into `folder` (in the background)."""
        from napari.qt.threading import thread_worker

        from ..models.versions import current_model_dir

        recipe, kind, fixed = self.choice
        data = [d for d in (self.data_edit.text().strip(), self.idrid_edit.text().strip()) if d]
        if not data:
            show_error("train elsewhere: choose a data folder")
            return None
        try:
            args = [recipe, *fixed, *self._budget(), "--batch-size", str(self.batch_spin.value()),
                    "--device", "auto", *self.option_args(), *shlex.split(self.extra_edit.text())]
        except ValueError as e:
            show_error(f"train elsewhere: {e}")
            return None
        init = current_model_dir(kind) if self.start_combo.currentIndex() == 0 else None
        if init is not None and (init / "config.json").is_file() and _same_scale(init, fixed):
            args += ["--init", "init"]
        else:
            init = None

        @thread_worker
        def work():
            import shutil

            from ..bundle import write_bundle

            summary = write_bundle(data, folder, LESIONS_OF[kind], args)
            if init is not None:
                shutil.copytree(init, Path(folder) / "init", ignore=shutil.ignore_patterns("run", "*.pt"))
            return summary

        worker = work()
        worker.returned.connect(lambda r: (self.status.setText(
            f"bundle written to {r['bundle']}: {r['images']} images, {r['labels']} labels, {r['left_out']} left out; "
            f"run `sh train.sh` there, then Import model... the folder runs/model"), self.bundle_written.emit(r)))
        worker.errored.connect(lambda e: show_error(f"train elsewhere: {str(e).splitlines()[0]}"))
        self.status.setText("writing the training bundle...")
        worker.start()
        return worker

    # --- comparing on the same images ------------------------------------------------------------
    def compare(self) -> None:
        """Score the version in use, then the new one, on the new one's validation images."""
        from ..models.versions import current_model_dir

        if self.process is not None or self.out is None or self.kind not in EVALUATE or getattr(self, "_compare", None):
            return
        out, kind = self.out, self.kind  # this run's, whatever the form says by the time the scores come
        try:
            names = json.loads((out / "config.json").read_text()).get("validation_images") or []
        except (OSError, ValueError):
            self.compare_label.setText(f"{out.name} has no model to compare")
            return
        data = self._folder_holding(names)
        if data is None:
            self.compare_label.setText("none of the data folders holds the new version's validation images")
            return
        what = EVALUATE[kind]
        self._compare_kind, self._compare_out = kind, out
        self._compare = [("in use", current_model_dir(kind)), ("new", out)]
        self._compare_results: dict[str, dict] = {}
        self._compare_args = lambda model, dest: ["-m", "napari_retina.cli", "evaluate", what, "--data", str(data),
                                                  "--model", str(model), "--split", "val", "--images-of",
                                                  str(out), "--out", str(dest)]
        self.compare_button.setEnabled(False)
        self._next_compare()

    def _folder_holding(self, names: list[str]) -> Path | None:
        from ..io.datasets import open_dataset

        wanted = {Path(n).stem for n in names}
        for d in (self.data_edit.text().strip(), self.idrid_edit.text().strip()):
            ds = open_dataset(d) if d else None
            if ds is not None and wanted & {r.stem for r in ds.records}:
                return Path(d)
        return None

    def _next_compare(self) -> None:
        if not self._compare:
            self._compare = None
            self._show_comparison()
            return
        name, model = self._compare[0]
        dest = self._compare_out / "run" / f"compare-{name.replace(' ', '-')}.json"
        dest.unlink(missing_ok=True)  # a score from an earlier comparison must not stand in for this one
        self.compare_label.setText(f"scoring the {name} version ({Path(model).name})...")
        proc = QProcess(self)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        proc.finished.connect(lambda code, _s=None, n=name, d=dest, p=proc: self._compared(n, d, code, p))
        self._compare_proc = proc
        proc.start(sys.executable, self._compare_args(model, dest))

    def _compared(self, name: str, dest: Path, code: int, proc) -> None:
        out = bytes(proc.readAll()).decode(errors="replace").strip().splitlines()
        proc.deleteLater()
        self._compare_proc = None
        try:
            if code != 0:
                raise ValueError(f"exit {code}")
            self._compare_results[name] = json.loads(dest.read_text())
        except (OSError, ValueError):
            self._compare = None
            self.compare_label.setText(f"scoring the {name} version failed: {(out or ['?'])[-1]}")
            self.compare_button.setEnabled(True)
            return
        self._compare.pop(0)
        self._next_compare()

    @staticmethod
    def _headline(kind: str, r: dict) -> str:
        if kind == "refiner":
            variants = r.get("iou_percent", {})
            v = variants.get("prototype") or next((x for k, x in variants.items() if k not in ("initial", "baseline")), {})
            return f"image-level IoU {v.get('average', {}).get('mean', float('nan')):.1f} %"
        return f"AUPR {r.get('aupr') or float('nan'):.3f}, F1 {r.get('f1') or float('nan'):.3f}"

    def _show_comparison(self) -> None:
        res = self._compare_results
        n = res.get("new", {}).get("images", "?")
        self.compare_label.setText(
            f"on the same {n} validation images, full resolution: in use {self._headline(self._compare_kind, res['in use'])}"
            f"  |  new {self._headline(self._compare_kind, res['new'])}")
        self.compare_button.setEnabled(True)

    @staticmethod
    def _figure(folder: Path) -> str | None:
        try:
            cfg = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        t = cfg.get("training", {})
        figs = {k: v for k, v in t.items() if "val" in k and isinstance(v, (int, float))}
        return ", ".join(f"{k} {v}" for k, v in figs.items()) + f" ({t.get('epochs', '?')} epochs)"

    def use_new(self) -> None:
        """Put every model this run trained in use (one, or each of a queue)."""
        runs = self._done_runs or ([(self.kind, self.out, "")] if self.out is not None and self.kind else [])
        for kind, out, _ in runs:
            self._use(kind, out)
        self.use_button.setEnabled(False)


def _same_scale(folder: Path, fixed: list[str]) -> bool:
    """A hypothesis network starts only from one of its own scale (both scales share the kind)."""
    if "--scale" not in fixed:
        return True
    try:
        scale = float(json.loads((folder / "config.json").read_text()).get("input_scale", 0))
    except (OSError, ValueError):
        return False
    return scale == float(fixed[fixed.index("--scale") + 1])


def _training_env() -> dict:
    """The environment of a `python -m training` process: ours, with the folder holding `training` on PYTHONPATH."""
    import os

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout (or site-packages) holding `training`
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _annotator_of(viewer):
    from .annotator import annotator_of

    return annotator_of(viewer)
