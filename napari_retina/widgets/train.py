"""Retrain a model from the graders' corrected labels, from napari, and swap the new version in.

The dock builds a `python -m training <model> ...` command line from its form (data: the folder
open now, plus optionally an IDRiD training folder; start from the version in use or from
scratch; device; epochs or minutes; batch size; any further recipe options) and runs it in its
own process (QProcess), so the GUI stays responsive and Cancel is clean: the trainer stops at the
end of the current step on SIGTERM, validates and keeps the best epoch in the new version's
folder. While it runs, the JSON-lines log is read once a second: napari's progress bar with an
ETA (the trainer's own estimate, from the data preparation's first image on), a live plot of the
training loss and the validation figure (pyqtgraph), device and throughput. When it ends: one
status line with the result and whether it is in use, the new version's validation figure beside
the one in use (both from the same held-out images, named in the cards), and "Use this model"
puts it in use through the viewer's annotation session (`session_of(viewer).use_model`), so the
refiner and every finder load it on their next call; the previous version stays listed. A
version that scores below the one in use on the same validation images, or never validated, is
used only after a question that shows both figures (`confirm_use`). "Import model..." adds a
folder trained elsewhere (checksum checked). The dock binds to the session, never to another dock.
"""

from __future__ import annotations

import datetime
import functools
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import napari
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QProcess, QProcessEnvironment, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem,
    QMessageBox, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from .activity import SlowAnimations, move_bar
from .viewer_session import session_of

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
# the microaneurysm detector's networks: a version of one is put in use for the next assembly
PARTS_OF_DETECTOR = ("ma-hgn", "ma-prn")
# each kind's headline validation figure in config.json: (name shown, path of keys); the first present counts
HEADLINE = {
    "exudates": [("validation AUPR", ("training", "val_aupr_working_scale"))],
    "ma-hgn": [("validation AUPR", ("training", "val_aupr_working_scale"))],
    "refiner": [("validation IoU %", ("training", "val_image_iou"))],
    "ma-prn": [("candidate ROC AUC", ("training", "val_candidate_auc_rule")),
               ("patch AUPR", ("training", "val_patch_aupr"))],
    "microaneurysms": [("validation AUPR", ("validation_scores", "aupr"))],
}


def confirm_use(parent, text: str) -> bool:
    """Ask before a version that scores worse (or never validated) is used; True: use it."""
    answer = QMessageBox.question(parent, "Use this model version?", text,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


def headline(folder: Path | None) -> tuple[str, float, frozenset, str] | None:
    """(figure's name, value, validation image stems, version) of a model folder; None without a figure."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    for name, path in HEADLINE.get(cfg.get("model"), []):
        v = cfg
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and v == v:
            images = frozenset(Path(n).stem for n in cfg.get("validation_images") or [])
            return name, float(v), images, str(cfg.get("version", Path(folder).name))
    return None


def worse_than_in_use(new: Path, in_use: Path | None) -> str | None:
    """The question to ask before `new` replaces `in_use`, or None when there is nothing to ask:
    `new` never validated, or scores below `in_use` on the same validation images."""
    try:
        version = json.loads((Path(new) / "config.json").read_text()).get("version", Path(new).name)
    except (OSError, ValueError):
        version = Path(new).name
    a = headline(new)
    b = headline(in_use) if in_use is not None and Path(in_use).resolve() != Path(new).resolve() else None
    if a is None:
        cur = f" The version in use, {b[3]}, has {b[0]} {b[1]:.4g}." if b else ""
        return f"{version} was never validated: nothing says how well it works.{cur}\n\nUse it anyway?"
    if b is None or a[0] != b[0] or a[2] != b[2] or a[1] >= b[1]:
        return None  # better, as good, or not comparable (other images or another figure)
    return (f"{version} scores below the version in use on the same {len(a[2])} validation images:\n\n"
            f"  {version}: {a[0]} {a[1]:.4g}\n  {b[3]} (in use): {b[0]} {b[1]:.4g}\n\nUse {version} anyway?")


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

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not getattr(self, "_tabified", False):  # once: opened beside the annotator, it becomes a tab next to it
            from ._docking import tabify_with_plugin_docks

            self._tabified = True
            QTimer.singleShot(0, lambda: tabify_with_plugin_docks(self))

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_of(napari_viewer)  # whatever proxy napari hands the dock
        # what must be stopped when the dock goes (window closed while training): plain Python,
        # reachable from the `destroyed` handler when the widget's own wrappers are gone
        self._live = _LiveProcesses()
        self.destroyed.connect(functools.partial(_LiveProcesses.end, self._live))
        self._auto_data = ""  # the data folder last filled in from the session (a typed one is kept)
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
        self.session.connect("image", self._on_image)
        self.session.connect("model", self._on_model)
        self.destroyed.connect(functools.partial(_disconnect, self.session, self._on_image, self._on_model))

    # --- the session ------------------------------------------------------------------------------
    def _on_image(self, _opened=None) -> None:
        """Another image or folder opened: the data folder follows, unless one was typed."""
        try:
            folder = self.session.data_folder
            text = self.data_edit.text().strip()
            if folder is not None and (not text or text == self._auto_data):
                self._auto_data = str(folder)
                self.data_edit.setText(self._auto_data)
        except RuntimeError:  # the dock is going
            pass

    def _on_model(self, kind: str, folder) -> None:
        """A version was put in use (here or in another view): the list and the status say which."""
        try:
            self._refresh_versions()
            if self.process is None and self._done_runs:
                self.status.setText(self._final_line())
        except RuntimeError:
            pass

    # --- form ------------------------------------------------------------------------------------
    def _build(self) -> None:
        from ._scroll import scrolling_layout

        lay, self._scroll, self._content = scrolling_layout(self)  # squeezed, the wrapped lines would be cut
        self._build_run_box(lay)  # first: the status, the result and its buttons show without scrolling
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

    def _build_run_box(self, lay) -> None:
        """Status, result, Use/Compare, then the plot: hidden until the first run."""
        self.run_box = run_box = QGroupBox("Training")
        rl = QVBoxLayout(run_box)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        rl.addWidget(self.status)
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
        brow = QHBoxLayout()
        brow.addWidget(self.use_button)
        brow.addWidget(self.compare_button)
        rl.addLayout(brow)
        self.compare_label = QLabel("")
        self.compare_label.setWordWrap(True)
        rl.addWidget(self.compare_label)
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
        run_box.setVisible(False)
        lay.addWidget(run_box)

    def _default_data(self) -> str:
        folder = self.session.data_folder
        self._auto_data = "" if folder is None else str(folder)
        return self._auto_data

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
            try:  # RuntimeError: the dock, or the process itself at the application's exit, is gone
                out = bytes(proc.readAllStandardOutput()).decode(errors="replace")
                err = bytes(proc.readAllStandardError()).decode(errors="replace").strip().splitlines()
                proc.deleteLater()
                try:
                    if code != 0:
                        raise ValueError((err or ["python -m training failed"])[-1])
                    options = json.loads(out)
                except ValueError as e:
                    self.options_box.setTitle(f"Recipe options: unavailable ({e})")
                    return
                self._build_options(recipe, options)
            except RuntimeError:
                return

        proc.finished.connect(done)
        self._live.describing.append(proc)
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
        try:
            t = json.loads((self.session.model_dir(kind) / "config.json").read_text()).get("training", {})
            cost = (f" (the version in use took {float(t['minutes']):.0f} min for {t['epochs']} epochs on "
                    f"{t.get('device', '?')})")
        except (OSError, ValueError, KeyError, TypeError):
            cost = ""
        return (f"no CUDA device here: training runs on the CPU{cost}; Train elsewhere if a GPU server "
                "is at hand")

    def _refresh_versions(self) -> None:
        from ..models.versions import versions

        _, kind, _ = self.choice
        self.device_label.setText(self._cost_line(kind))
        self.version_list.clear()
        self._versions = versions(kind)
        current = self.session.model_dir(kind).resolve()
        for v in self._versions:
            mark = "in use: " if v.folder.resolve() == current else ""
            self.version_list.addItem(mark + v.label)

    def use_selected(self) -> None:
        row = self.version_list.currentRow()
        if 0 <= row < len(self._versions):
            self._use(self._versions[row].kind, self._versions[row].folder)

    def _use(self, kind: str, folder: Path, ask: bool = True) -> bool:
        """Put `folder` in use for `kind` through the session (every live model of that kind loads it
        on its next call); a version worse than the one in use, or never validated, asks first."""
        question = worse_than_in_use(folder, self.session.model_dir(kind)) if ask else None
        if question is not None and not confirm_use(self, question):
            self.status.setText(f"{kind}: kept {self._version_name(self.session.model_dir(kind))} in use; "
                                f"{self._version_name(folder)} not used")
            return False
        try:
            self.session.use_model(kind, folder)
        except Exception as e:  # noqa: BLE001 - the registry's one line for a refused folder
            show_error(str(e).splitlines()[0])
            return False
        self._refresh_versions()
        line = f"{kind}: now using {self._version_name(folder)}"
        if kind in PARTS_OF_DETECTOR:  # no live model runs these networks on their own
            line += (" (Find microaneurysms runs the assembled detector: assemble it with "
                     "`python -m training microaneurysms` to use this network there)")
        self.status.setText(self._final_line() if self._done_runs and self.process is None else line)
        show_info(line)
        return True

    @staticmethod
    def _version_name(folder: Path) -> str:
        h = headline(folder)
        if h is not None:
            return h[3]
        try:
            return str(json.loads((Path(folder) / "config.json").read_text()).get("version", Path(folder).name))
        except (OSError, ValueError):
            return Path(folder).name

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
        # an imported model is imported to be used (after the question, if it scores worse); the previous version stays
        if self._use(kind, target):
            show_info(f"imported {target.name} and put it in use")
        else:
            self._refresh_versions()  # listed, not in use
            show_info(f"imported {target.name}; not in use")
        return target

    # --- running ------------------------------------------------------------------------------------
    def command(self, label: str | None = None) -> tuple[list[str], Path, str]:
        """(the `python -m training ...` arguments the form describes, the new version's folder, its kind).

        `label`: a queued model instead of the one shown: the same data, device and budget, its
        own options line, its recipe's defaults for the rest.
        """
        from ..models.versions import new_version_dir

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
        current = self.session.model_dir(kind)
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
        self._bar_done = 0
        self.result.setText("")
        self.use_button.setEnabled(False)
        self.run_box.setVisible(True)
        proc = QProcess()  # no Qt parent: the dock's end stops it (`_LiveProcesses`), never its destructor
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
        self._live.processes.append(proc)
        self._live.out = self.out if fresh else None  # a resumed folder has checkpoints to keep anyway
        if self._pbar is None:
            from napari.utils import progress

            # made before the process starts: napari processes pending events while it makes a
            # bar, and the process's end must find it. In percent of the run's estimated length
            self._pbar = progress(total=100, desc=f"training {self.kind}")
        if self._slowed is None:
            self._slowed = SlowAnimations(self)  # for hours it would slow the training
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
        try:
            if self.process is not None:
                self._output = (self._output + bytes(self.process.readAllStandardOutput()).decode(errors="replace"))[-4000:]
        except RuntimeError:  # the window closed meanwhile
            pass

    def progress_line(self) -> tuple[str, float | None]:
        """(the status line the log's events so far describe, the fraction of the run done or None)."""
        events = self.events
        start = next((e for e in reversed(events) if e.get("event") == "start"), None)
        last = next((e for e in reversed(events) if e.get("event") in ("prepare", "start", "step", "validate", "epoch")),
                    None)
        if last is None:
            return "", None
        # the trainer's estimate of what is left, less the time since it was logged
        eta = last.get("eta")
        if eta is not None and last.get("time"):
            eta = max(0.0, float(eta) - max(0.0, time.time() - float(last["time"])))
        elapsed = last.get("elapsed")
        if elapsed is not None and last.get("time"):
            elapsed = float(elapsed) + max(0.0, time.time() - float(last["time"]))
        done = None if eta is None or elapsed is None else elapsed / max(elapsed + eta, 1e-9)
        event = last.get("event")
        parts = []
        if event == "prepare":
            left = f", about {_duration(eta)} more" if eta is not None else ""
            parts.append(f"preparing the data: {last.get('what', 'loading')} {last.get('done')} of "
                         f"{last.get('total')}{left}")
            # the preparation knows its own end only; the run's is the budget's, when there is one
            minutes = self._budget_minutes()
            done = None if minutes is None or elapsed is None else min(elapsed / (60 * minutes), 1.0)
            eta = None if minutes is None or elapsed is None else max(0.0, 60 * minutes - elapsed)
        else:
            start = start or {}
            monitor = start.get("monitor", "val_loss")
            total = start.get("epochs")
            parts.append(f"device {start.get('device', '?')}")
            epochs = [e for e in events if e.get("event") == "epoch"]
            epoch = last.get("epoch", 1)
            of = f" of {total}" if total else ""
            if event == "step":
                parts.append(f"epoch {epoch}{of}: batch {last.get('batch')} of {last.get('batches')}, "
                             f"loss {float(last.get('loss', float('nan'))):.3g}")
            elif event == "validate":
                parts.append(f"epoch {epoch}{of}: validating (about {float(last.get('expected', 0)):.0f} s)")
            elif event == "start":
                parts.append("training starts")
            if epochs:
                e = epochs[-1]
                name = MONITOR_NAMES.get(monitor, monitor)
                parts.append(f"after epoch {e['epoch']}: {name} {float(e.get(monitor, float('nan'))):.3g} "
                             f"(best {float(e.get('best', float('nan'))):.3g}), "
                             f"{float(e.get('samples_per_s', 0)):.1f} samples/s")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts), done

    def _budget_minutes(self) -> float | None:
        args = getattr(self, "_last_args", []) or []
        try:
            return float(args[args.index("--minutes") + 1]) if "--minutes" in args else None
        except (ValueError, IndexError):
            return None

    def poll(self) -> None:
        """Read what the log gained since the last call; update plot, progress and status."""
        if self.out is None:
            return
        events, self._offset = read_log(self.out / "run" / "log.jsonl", self._offset)
        if events:
            self.events += events
        elif self.process is None or not self.events:
            return
        start = next((e for e in self.events if e.get("event") == "start"), {})
        epochs = [e for e in self.events if e.get("event") == "epoch"]
        monitor = start.get("monitor", "val_loss")
        if events and epochs:
            xs = [e["epoch"] for e in epochs]
            self.loss_curve.setData(xs, [e.get("train_loss", float("nan")) for e in epochs])
            vals = [float(e.get(monitor, float("nan"))) for e in epochs]
            scale = 100.0 if monitor == "val_iou" else 1.0
            self.val_curve.setData(xs, [v / scale for v in vals])
        line, done = self.progress_line()
        if line and self.process is not None:
            self.status.setText(line)
        if self._pbar is not None and done is not None:  # last: it may run the process's end, whose status line stays
            self._bar_done = max(self._bar_done, min(99, int(100 * done)))  # never backwards
            move_bar(self._pbar, self._bar_done, 100)

    def _on_finished(self, code: int, _status=None) -> None:
        try:
            self._finish(code)
        except RuntimeError:  # the window closed meanwhile: nothing left to show
            pass

    def _finish(self, code: int) -> None:
        self.poll()
        self._poll.stop()
        proc, self.process = self.process, None
        if proc is not None:
            self._on_output()
            if proc in self._live.processes:
                self._live.processes.remove(proc)
            proc.deleteLater()
        self._live.out = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._slowed is not None:
            self._slowed.release()
            self._slowed = None
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        new = self._figure(self.out) if self.out is not None else None
        if new is None:
            removed = self.out is not None and discard_unfinished(self.out)  # no empty version folder
            self._refresh_versions()
            dropped = f"; not started: {', '.join(self._queue)}" if self._queue else ""
            self._queue = []
            what = "cancelled before its first checkpoint" if self._cancelled else f"failed (exit {code})"
            self.status.setText(f"training {what}, no model{' (its folder removed)' if removed else ''}: "
                                f"{_error_line(self._output)}{dropped}")
            return
        self._refresh_versions()
        cur = self._figure(self.session.model_dir(self.kind))
        verb = "cancelled; kept" if self._cancelled else "done:"
        self.resume_button.setEnabled(self._cancelled)
        self._done_runs.append((self.kind, self.out, f"{verb} new {self.kind} version {self.out.name}: {new}"
                                f"   |   in use: {cur or 'none'}"))
        self._end_event = next((e for e in reversed(self.events) if e.get("event") == "end"), {})
        self.result.setText("\n".join(line for _, _, line in self._done_runs)
                            + "\n(figures of training: their validation images may differ)")
        self.use_button.setText("Use this model" if len(self._done_runs) == 1 else
                                f"Use these {len(self._done_runs)} models")
        self.use_button.setEnabled(True)
        self.status.setText(self._final_line())
        if self._queue and not self._cancelled:
            QTimer.singleShot(0, self._start_next)
        elif self._queue:
            self.status.setText(self.status.text() + f"; not started: {', '.join(self._queue)}")
            self._queue = []
        self.compare_button.setEnabled(self.kind in EVALUATE)
        self.compare_label.setText("" if self.kind in EVALUATE else
                                   "assemble the microaneurysm networks (python -m training microaneurysms) "
                                   "to compare detectors with napari-retina evaluate ma")

    def _final_line(self) -> str:
        """The run's last status: how it ended, each new version's figure against the one in use, and
        whether it is in use."""
        end = getattr(self, "_end_event", {}) or {}
        how = {"time": "the time budget", "epochs": "its epochs", "early": "early stopping",
               "requested": "Cancel"}.get(end.get("stopped"), "its end")
        took = f" in {_duration(float(end['elapsed']))}" if end.get("elapsed") is not None else ""
        parts = []
        for kind, out, _ in self._done_runs:
            new, in_use = headline(out), self.session.model_dir(kind)
            cur = headline(in_use)
            used = Path(in_use).resolve() == Path(out).resolve()
            fig = f"{new[0]} {new[1]:.4g}" if new else "not validated"
            cmp = "" if used or cur is None else f" (in use: {cur[3]}, {cur[0]} {cur[1]:.4g})"
            state = "now in use" if used else "not in use: Use this model to use it"
            parts.append(f"{self._version_name(out)}: {fig}{cmp}; {state}")
        return f"training ended{took}, stopped by {how}. " + "; ".join(parts)

    # --- train elsewhere ---------------------------------------------------------------------------
    def _choose_bundle(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "An empty folder for the training bundle")
        if d:
            self.write_bundle(d)

    def write_bundle(self, folder: str | Path):
        """Write the labels of the data folders and this form's command into `folder` (in the background)."""
        from napari.qt.threading import thread_worker

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
        init = self.session.model_dir(kind) if self.start_combo.currentIndex() == 0 else None
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
        self._compare = [("in use", self.session.model_dir(kind)), ("new", out)]
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
        proc = QProcess()  # stopped by `_LiveProcesses` if the window closes meanwhile
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        proc.finished.connect(lambda code, _s=None, n=name, d=dest, p=proc: self._compared(n, d, code, p))
        self._compare_proc = proc
        self._live.processes.append(proc)
        proc.start(sys.executable, self._compare_args(model, dest))

    def _compared(self, name: str, dest: Path, code: int, proc) -> None:
        out = bytes(proc.readAll()).decode(errors="replace").strip().splitlines()
        if proc in self._live.processes:
            self._live.processes.remove(proc)
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
        used = [self._use(kind, out) for kind, out, _ in runs]
        self.use_button.setEnabled(not all(used))
        self.status.setText(self._final_line())


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


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _error_line(output: str) -> str:
    """The one line a failed `python -m training` printed about why (its "error:" line, else its last)."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ": error: " in ln:
            return ln.split(": error: ", 1)[1]
    return lines[-1] if lines else "no model was written"


def _disconnect(session, on_image, on_model, *_):
    session.disconnect("image", on_image)
    session.disconnect("model", on_model)


class _LiveProcesses:
    """The dock's running processes and the version folder its run writes, kept apart from the
    widget: when the window closes while training, `end` stops them quietly (no slot reaches the
    deleted widget) and removes a version folder that holds no model and no checkpoint."""

    def __init__(self):
        self.processes: list = []
        self.describing: list = []  # `--describe-options` processes: their end cleans them up
        self.out: Path | None = None

    def end(self, *_):
        for proc in self.describing:  # the application's children: ended now, not at its exit
            _kill(proc)
        self.describing = []
        for proc in self.processes:
            _kill(proc, quiet=True)
        self.processes = []
        if self.out is not None:
            discard_unfinished(self.out)


def _kill(proc, quiet: bool = False) -> None:
    """End a QProcess that may still run (`quiet`: none of its signals reach the dock being deleted)."""
    try:
        if quiet:
            proc.blockSignals(True)
        if proc.state() != QProcess.ProcessState.NotRunning:
            proc.kill()
            proc.waitForFinished(3000)
    except RuntimeError:  # already deleted
        pass


def discard_unfinished(out: Path) -> bool:
    """Remove a version folder that holds neither a model (config.json) nor a checkpoint (a failed
    run, or one stopped before its first); True if removed."""
    out = Path(out)
    if not out.is_dir() or (out / "config.json").is_file() or any((out / "run" / "checkpoints").glob("*.pt")):
        return False
    shutil.rmtree(out, ignore_errors=True)
    return True
