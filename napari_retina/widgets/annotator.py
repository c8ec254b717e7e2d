"""The lesion annotator dock: lesion class, ellipses, display aids, counts, images, autosave.

A thin view over the viewer's `AnnotationSession` (session_of(viewer)): the folder and image
open, the model versions in use and the project live there, so the Retrain dock, File > Open
and this dock agree. Painting, erasing and undo are napari's own Labels tools; the layers and
what passes between them and the image's `PixelRecord` are `LesionLayers`' work. This dock
steps through a folder's images, takes over what File > Open, drag-and-drop and Open Sample
add (saving the image open before), and autosaves into the annotation project folder. The
record says what changed, so a save copies and writes only that. The GUI thread never waits
on a disk write or an image decode.
"""

from __future__ import annotations

import getpass
import time
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path

import napari
import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSlider,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..io.datasets import Dataset, ImageRecord, open_dataset
from ..io.ellipses import Ellipse, EllipseFile
from ..io.errors import RetinaInputError
from ..io.project import Annotation, ProjectFolder
from ..lesions import LESION_CODES, LESIONS, lesion
from ..proposals import PixelChange
from ..session import (
    META_KEY,
    OpenedImage,
    layer_data,
    looks_like_fundus,
    open_record,
)
from .counts import LesionCounts
from .display import ImageDisplay
from .lesion_layers import IMAGE_ROLES, LesionLayers, layer_image, layer_role
from .ellipses import EllipseEditing
from .refine import REFINER, EllipseRefinement
from .review import LesionReview
from .segment import LesionFinder
from .viewer_session import real_viewer, session_of

AUTOSAVE_TICK_MS = 250  # how often the session's autosave is asked whether a save is due




class _SaveSignals(QObject):
    done = Signal(object)  # (project_dir, lesion rows | None, error message | None, snapshot | None)
    counted = Signal(object)  # (project writer, lesion rows)


class LesionAnnotator(QWidget):
    """Dock widget: pick the lesion class, draw ellipses, paint; everything is autosaved."""

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        parent: QWidget | None = None,
        model_dir=None,
        preload_model: bool = True,
        exudate_model_dir=None,
        ma_model_dir=None,
    ):
        super().__init__(parent)
        from .mesh_shaders import keep_mesh_shaders

        keep_mesh_shaders()  # an added ellipse must not recompile the Shapes layer's shaders
        # napari hands a dock opened from the Plugins menu a proxy that hides private attributes
        # and wraps every layer it returns; this dock keeps to napari's public API, and works on
        # the viewer itself so that the layers it compares and connects are the real ones
        self.viewer = real_viewer(napari_viewer)
        self.session = session_of(napari_viewer)
        # folders given by hand (the command line's --model, tests) run in this viewer only
        for kind, folder in ((REFINER, model_dir), ("exudates", exudate_model_dir), ("microaneurysms", ma_model_dir)):
            if folder is not None:
                self.session.pin_model(kind, folder)
        self.layers = LesionLayers(self.viewer, self.session, self)
        self.layers.edited.connect(self._edited)
        self.layers.message.connect(lambda text: self.status_label.setText(text))
        self.layers.lesion_wanted.connect(self.set_lesion)
        self.refinement = EllipseRefinement(self.layers, self)
        self.ellipses = EllipseEditing(self.layers, self.refinement, grader=self._grader, loading=lambda: self._loading,
                                       parent=self)
        self.current = LESION_CODES[0]
        self.summary: list[dict] = []
        self.last_saved: datetime | None = None
        self._last_error: str | None = None
        self._loading = False
        self._signals = _SaveSignals()
        self._signals.done.connect(self._on_saved)
        self._signals.counted.connect(self._on_counted)
        # the session's autosave reports from its writer thread: a Qt signal brings it to the GUI thread
        self.autosave = self.session.autosave
        self.session.connect("saved", self._from_writer_thread)
        self._tabified = False
        self._adding = False  # the dock adds its own image's layers
        self._reader_waiting: Layer | None = None  # a reader's image that came while the dock was loading
        self._build_ui()
        self._bind_keys()
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.session.connect("model", self._on_model_changed)
        self.refinement.model_status.connect(lambda text: self.model_label.setText(text))
        self._timer = QTimer(self)
        self._timer.setInterval(AUTOSAVE_TICK_MS)
        self._timer.timeout.connect(self.autosave_tick)
        self._timer.start()
        self.refinement.model_ready.connect(self._on_model_ready)
        self._adopt_layers()
        if preload_model:
            self.refinement.load_model()  # in the background: the first ellipse is then refined at once

    # --- UI ----------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from ._scroll import scrolling_layout

        lay, scroll, content = scrolling_layout(self)  # squeezed, the count table would hide rows
        self.image_label = QLabel("Open a fundus image or a folder (File > Open)")
        self.image_label.setWordWrap(True)
        lay.addWidget(self.image_label)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.status_label)  # saving, errors and tool messages: always in view
        # two pages, so that each fits a 1000-px-high window without scrolling: what the grader
        # does to the image, and what concerns the image and its project
        self.tabs = QTabWidget()
        annotate_page, image_page = QWidget(), QWidget()
        alay, ilay = QVBoxLayout(annotate_page), QVBoxLayout(image_page)
        for page_lay in (alay, ilay):
            page_lay.setContentsMargins(0, 4, 0, 0)
        self.tabs.addTab(annotate_page, "Annotate")
        self.tabs.addTab(image_page, "Image && project")
        lay.addWidget(self.tabs)

        box = QGroupBox("Lesion class")
        grid = QGridLayout(box)
        self.class_buttons = QButtonGroup(self)
        self.class_buttons.setExclusive(True)
        for i, les in enumerate(LESIONS):
            b = QToolButton()
            b.setText(f"{les.code}  {les.name}")
            b.setToolTip(f"{les.layer_name} ({les.shortcut.replace('-', '+')})")
            b.setCheckable(True)
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
            b.setStyleSheet(
                f"QToolButton {{ border-left: 6px solid {les.colour}; padding: 3px; text-align: left; }}"
                f"QToolButton:checked {{ background: {QColor(les.colour).darker(250).name()}; }}"
            )
            b.setSizePolicy(b.sizePolicy().horizontalPolicy().Expanding, b.sizePolicy().verticalPolicy())
            self.class_buttons.addButton(b, i)
            grid.addWidget(b, i // 2, i % 2)
        self.class_buttons.idClicked.connect(lambda i: self.set_lesion(LESIONS[i].code))
        tools = QHBoxLayout()
        self.ellipse_button = QPushButton("Draw ellipse")
        self.ellipse_button.clicked.connect(self.start_ellipse)
        self.paint_button = QPushButton("Paint")
        self.paint_button.clicked.connect(lambda: self.start_painting("paint"))
        self.erase_button = QPushButton("Erase")
        self.erase_button.clicked.connect(lambda: self.start_painting("erase"))
        for b in (self.ellipse_button, self.paint_button, self.erase_button):
            tools.addWidget(b)
        grid.addLayout(tools, 3, 0, 1, 2)
        # one Accept per class: refined ellipses and finder candidates alike become the grader's own
        self.accept_button = QPushButton("Accept EX")
        self.accept_button.setToolTip("keep the pending (lighter) pixels of the active lesion class as yours")
        self.accept_button.clicked.connect(lambda: self.accept_proposals(self.current))
        grid.addWidget(self.accept_button, 4, 0, 1, 2)
        alay.addWidget(box)

        ref = QGroupBox("Ellipse refinement")
        rl = QGridLayout(ref)
        self.auto_refine = QCheckBox("refine ellipses at once")
        self.auto_refine.setChecked(True)
        self.auto_refine.toggled.connect(self._on_auto_refine)
        self.superpixel_check = QCheckBox("superpixel weighting")
        self.superpixel_check.toggled.connect(self._on_superpixels)
        # one check box per row: side by side they made the dock wider than napari's default window leaves
        rl.addWidget(self.auto_refine, 0, 0, 1, 2)
        rl.addWidget(self.superpixel_check, 5, 0, 1, 2)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(5, 95)
        self.threshold_slider.setValue(50)
        self.threshold_slider.setToolTip("probability threshold (live preview on this session's ellipses)")
        self.threshold_label = QLabel("threshold 0.50")
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        rl.addWidget(self.threshold_label, 1, 0)
        rl.addWidget(self.threshold_slider, 1, 1)
        self.refine_all_button = QPushButton("Refine all")
        self.refine_all_button.setToolTip("refine every ellipse again (e.g. ellipses loaded from a file)")
        self.refine_all_button.clicked.connect(self.refine_all)
        self.import_button = QPushButton("Import ellipses...")
        self.import_button.clicked.connect(self._choose_ellipse_file)
        rl.addWidget(self.refine_all_button, 2, 0)
        rl.addWidget(self.import_button, 2, 1)
        self.model_label = QLabel("loading the refinement model...")
        rl.addWidget(self.model_label, 4, 0, 1, 2)
        alay.addWidget(ref)

        self.exudate_finder = LesionFinder(self.layers, "EX")
        alay.addWidget(self.exudate_finder)
        self.ma_finder = LesionFinder(self.layers, "MA")
        alay.addWidget(self.ma_finder)
        self.ma_review = LesionReview(self.layers, "MA", overlay_layer=self.ma_finder.overlay_layer)
        self.ma_finder.changed.connect(lambda code: self.ma_review.candidates_changed())
        alay.addWidget(self.ma_review)
        alay.addStretch(1)
        self.finders = (self.exudate_finder, self.ma_finder)

        self.display = ImageDisplay(self.layers)
        self.display.fov_ready.connect(self._on_fov_ready)
        self.display_combo, self.fov_check = self.display.display_combo, self.display.fov_check
        ilay.addWidget(self.display)

        self.counts = LesionCounts()
        self.counts.reviewed_toggled.connect(self.set_reviewed)
        ilay.addWidget(self.counts)

        imgs = QGroupBox("Images (PageUp / PageDown)")
        il = QVBoxLayout(imgs)
        self.image_list = QListWidget()
        self.image_list.setMaximumHeight(140)
        self.image_list.itemActivated.connect(lambda item: self.go_to(self.image_list.row(item)))
        il.addWidget(self.image_list)
        nav = QHBoxLayout()
        self.prev_button = QPushButton("< previous")
        self.prev_button.clicked.connect(self.previous_image)
        self.next_button = QPushButton("next >")
        self.next_button.clicked.connect(self.next_image)
        nav.addWidget(self.prev_button)
        nav.addWidget(self.next_button)
        il.addLayout(nav)
        ilay.addWidget(imgs)

        proj = QGroupBox("Project (autosaved)")
        pl = QGridLayout(proj)
        pl.addWidget(QLabel("grader"), 0, 0)
        self.grader_edit = QLineEdit(_user())
        pl.addWidget(self.grader_edit, 0, 1)
        self.project_label = QLabel("-")
        self.project_label.setWordWrap(True)
        self.project_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        pl.addWidget(self.project_label, 1, 0, 1, 2)
        self.choose_button = QPushButton("Project folder...")
        self.choose_button.setToolTip("Save projects under another folder instead of beside the images")
        self.choose_button.clicked.connect(self._choose_project_root)
        self.save_button = QPushButton("Save now")
        self.save_button.clicked.connect(lambda: self.save(summary=True))
        pl.addWidget(self.choose_button, 2, 0)
        pl.addWidget(self.save_button, 2, 1)
        ilay.addWidget(proj)
        ilay.addStretch(1)
        lay.addStretch(1)
        self.class_buttons.button(0).setChecked(True)
        # as wide as the content: only the height scrolls
        self._scroll, self._content = scroll, content
        self._fit_width()

    def _fit_width(self) -> None:
        scroll, content = self._scroll, self._content
        # the scroll bar napari's style draws is a few pixels wider than its size hint says
        bar = max(scroll.verticalScrollBar().sizeHint().width(), scroll.verticalScrollBar().width() if scroll.verticalScrollBar().isVisible() else 0)
        scroll.setMinimumWidth(content.minimumSizeHint().width() + bar + 2 * scroll.frameWidth() + 4)

    def changeEvent(self, event) -> None:
        # napari's style sheet arrives when the dock is added (larger font, padding): widen to fit it
        if event.type() in (QEvent.Type.StyleChange, QEvent.Type.FontChange) and hasattr(self, "_scroll"):
            self._fit_width()
        super().changeEvent(event)

    def showEvent(self, event) -> None:
        self._fit_width()
        super().showEvent(event)
        if not self._tabified:  # once: opened beside the Retrain dock, it becomes a tab next to it
            from ._docking import tabify_with_plugin_docks

            self._tabified = True
            QTimer.singleShot(0, lambda: tabify_with_plugin_docks(self))

    def _bind_keys(self) -> None:
        for les in LESIONS:
            self.viewer.bind_key(les.shortcut, self._lesion_key(les.code), overwrite=True)
        self.viewer.bind_key("PageDown", lambda v: self.next_image(), overwrite=True)
        self.viewer.bind_key("PageUp", lambda v: self.previous_image(), overwrite=True)

    def _lesion_key(self, code: str):
        def switch(viewer):
            self.set_lesion(code)

        switch.__name__ = f"switch_to_{code}"
        return switch

    # --- the session's state, as this dock's attributes ---------------------------------------
    @property
    def opened(self) -> OpenedImage | None:
        return self.session.opened

    @opened.setter
    def opened(self, value: OpenedImage | None) -> None:
        self.session.opened = value

    @property
    def dataset(self) -> Dataset | None:
        return self.session.dataset

    @dataset.setter
    def dataset(self, value: Dataset | None) -> None:
        self.session.dataset = value

    @property
    def index(self) -> int:
        return self.session.index

    @index.setter
    def index(self, value: int) -> None:
        self.session.index = value

    @property
    def project_root(self) -> Path | None:
        return self.session.project_root

    @project_root.setter
    def project_root(self, value: Path | None) -> None:
        self.session.project_root = value

    @property
    def fov(self) -> np.ndarray | None:
        return self.layers.fov

    @fov.setter
    def fov(self, value: np.ndarray | None) -> None:
        self.layers.fov = value

    # --- layers ------------------------------------------------------------------------
    def layers_with_role(self, role: str) -> list[Layer]:
        return self.layers.layers_with_role(role)

    @property
    def image_layer(self) -> Image | None:
        return self.layers.image_layer

    @property
    def ellipses_layer(self) -> Shapes | None:
        return self.layers.ellipses_layer

    def lesion_layer(self, code: str) -> Labels | None:
        return self.layers.lesion_layer(code)

    def _on_layer_inserted(self, event) -> None:
        if layer_role(event.value) != "image":
            return
        if self._loading:
            if not self._adding:  # File > Open while the dock opens another image: its turn comes next
                self._reader_waiting = event.value
            return
        if self.opened is None:
            # a reader added a fundus image after the dock was opened: wait for its lesion layers
            QTimer.singleShot(0, self._adopt_layers)
        elif layer_image(event.value) is not None and event.value is not self.image_layer_of_opened():
            # File > Open, drag-and-drop or Open Sample while an image is open: switch to it,
            # once the reader has added all its layers
            QTimer.singleShot(0, lambda layer=event.value: self._switch_to_reader_layers(layer))

    def image_layer_of_opened(self) -> Image | None:
        """The image layer of the image open now (the reader may have added another one)."""
        op = self.opened
        for layer in self.layers_with_role("image"):
            if op is not None and layer_image(layer) == str(op.record.image) and self.layers.owns(layer):
                return layer
        return None

    def _switch_to_reader_layers(self, new_image: Layer) -> None:
        """Another image came through napari's reader: save the one open, then make the new one
        the session's image (one set of lesion layers, the dock naming it)."""
        if new_image not in self.viewer.layers or self._loading:
            return
        new_path = layer_image(new_image)
        new_layers = [l for l in self.viewer.layers if layer_image(l) == new_path and not self.layers.owns(l)
                      and layer_role(l) in IMAGE_ROLES]
        op = self.opened
        info = new_image.metadata.get(META_KEY, {})
        same_project = op is not None and info.get("project") and Path(info["project"]).resolve() == op.project_dir.resolve()
        if op is not None and (str(op.record.image) == new_path or same_project):
            # the image open now, opened again: keep the live one (its unsaved edits included)
            for layer in new_layers:
                self.viewer.layers.remove(layer)
            self.status_label.setText(f"{op.record.image.name} is already open")
            return
        for finder in self.finders:  # a run on the old image stops; what it proposed goes before the save
            finder.image_changed()
        if op is not None and (self.has_unsaved_changes() or self.autosave.summary_since is not None):
            self.save(summary=True)
        self.ma_review.image_changed()
        keep = {id(l) for l in new_layers}
        self._loading = True
        try:
            for layer in list(self.viewer.layers):
                if layer_role(layer) in IMAGE_ROLES and id(layer) not in keep:
                    self.viewer.layers.remove(layer)
            self.opened = None
        finally:
            self._loading = False
        for layer in new_layers:  # napari named them "EX hard exudates [1]" while the old ones were there
            if layer_role(layer) == "lesion":
                layer.name = lesion(layer.metadata[META_KEY]["lesion"]).layer_name
            elif layer_role(layer) == "ellipses":
                layer.name = "ellipses"
            elif layer_role(layer) == "image":
                layer.name = Path(new_path).stem
        self._adopt_layers()
        self.viewer.reset_view()

    def _adopt_layers(self) -> None:
        """Take over layers the reader added (image, lesions, ellipses) and restore the project."""
        img = self.image_layer
        if img is None or self.opened is not None:
            return
        self.layers.own(img)
        info = img.metadata[META_KEY]
        image_path = Path(info["image"])
        dataset = None
        if info.get("dataset"):
            try:
                dataset = open_dataset(info["dataset"])
            except OSError:
                dataset = None
        record = ImageRecord(image=image_path)
        i = dataset.index_of(image_path) if dataset is not None else -1
        if i >= 0:
            record = dataset.records[i]
        elif image_path.parent.name.endswith(".retina"):
            record = ImageRecord(image=image_path, project=image_path.parent)
        project_dir = Path(info["project"])
        ann = Annotation.empty(image_path.name, img.data.shape[:2])
        for les in LESIONS:  # the reader's layers hold the masks as opened
            layer = self.lesion_layer(les.code)
            if layer is not None and layer.data.shape == ann.shape:
                ann.masks[les.code] = np.asarray(layer.data) != 0
        # lesions whose file was unreadable (the reader said so once): not overwritten until edited
        ann.unreadable = dict(info.get("unreadable") or {})
        pf = ProjectFolder(project_dir)
        if pf.exists():
            try:  # restore the project's bookkeeping (provenance, model proposals); the layers hold the masks
                pf.remove_leftovers()
                pf.load_bookkeeping(ann)
            except RetinaInputError as e:
                show_error(str(e))
            if ann.notes:
                show_error("; ".join(ann.notes))
        self.opened = OpenedImage(
            record=record,
            rgb=np.asarray(img.data),
            annotation=ann,
            project_dir=project_dir,
            from_project=pf.exists(),
            dataset_root=dataset.root if dataset else None,
        )
        if dataset is None and self.session.dataset is not None:
            # an image of the folder being worked through: keep the folder's image list
            i = self.session.dataset.index_of(image_path)
            if i >= 0:
                dataset = self.session.dataset
                self.opened.record = dataset.records[i]
        self.dataset = dataset
        self.index = dataset.index_of(image_path) if dataset else 0
        self._ensure_layers()
        self.viewer.layers.selection.active = self.lesion_layer(self.current)
        self._after_open()

    def _ensure_layers(self) -> None:
        """Create any lesion/ellipse layer the grader deleted or the reader did not make."""
        op = self.opened
        assert op is not None
        missing = []
        for data, kwargs, kind in layer_data(op):
            role = kwargs["metadata"][META_KEY]["role"]
            if role == "image":
                continue
            if role == "lesion" and self.lesion_layer(kwargs["metadata"][META_KEY]["lesion"]) is None:
                # the layer's pixels come from the annotation (empty when adopting)
                missing.append((data, kwargs, kind))
            elif role == "ellipses" and self.ellipses_layer is None:
                missing.append((data, kwargs, kind))
        for item in missing:
            self.viewer.add_layer(Layer.create(*item))
        for layer in self.viewer.layers:
            if layer_role(layer) in IMAGE_ROLES:
                self.layers.own(layer)  # this image's layers: a reader's new ones are told apart
        for les in LESIONS:
            layer = self.lesion_layer(les.code)
            self.layers.connect_lesion_layer(layer, les.code)
            layer.selected_label = les.label
        self.ellipses.connect_layer(self.ellipses_layer)
        self.set_lesion(self.current, activate=False)

    def _after_open(self) -> None:
        op = self.opened
        self.autosave.begin(op, self._ellipse_dicts(), self._grader())
        self._refresh_list()
        where = "restored from" if op.from_project else "will be saved in"
        self.project_label.setText(f"{where} {op.project_dir}")
        n = f" ({self.index + 1}/{len(self.dataset)})" if self.dataset else ""
        self.image_label.setText(f"<b>{op.record.image.name}</b>{n}")
        self.refinement.reset(self.current_ellipses())
        self.session.set_opened(op, self.dataset, self.index)  # the Retrain dock follows the folder
        for finder in self.finders:
            finder.show_restored()
        self.ma_review.image_changed()
        self._show_reviewed()
        self.display.image_opened()  # the counts follow once the field of view is known

    def _on_model_changed(self, kind: str, folder) -> None:
        """A model version was put in use (here, in the Retrain dock or by an import): the next
        refinement and Find of that kind run on it."""
        from ..segmentation import SEGMENTER_KINDS

        if kind == REFINER:
            self.refinement.model_changed()
        for finder in self.finders:
            if SEGMENTER_KINDS.get(finder.code) == kind:
                finder.model_changed()

    # --- reviewed lesions (labels for retraining) ---------------------------------------------
    def _show_reviewed(self) -> None:
        self.counts.show_reviewed(self.opened.annotation.reviewed if self.opened is not None else set())

    def set_reviewed(self, code: str, on: bool = True) -> None:
        """Mark one lesion of the open image as reviewed (or not): saved in the project at once."""
        if self.opened is None:
            self._show_reviewed()
            return
        self.opened.annotation.set_reviewed(code, on, grader=self._grader())
        self._show_reviewed()
        self.save(summary=True)
        self.status_label.setText(f"{code} {'reviewed: a label for retraining' if on else 'no longer marked reviewed'}")

    # --- lesion class and tools -----------------------------------------------------------
    def set_lesion(self, code: str, activate: bool = True) -> None:
        """Make `code` the active class: its Labels layer for painting, its colour for new ellipses."""
        les = lesion(code)
        self.current = les.code
        self.class_buttons.button(LESION_CODES.index(les.code)).setChecked(True)
        self.accept_button.setText(f"Accept {les.code}")
        self.ellipses.set_class(les.code)
        shapes = self.ellipses_layer
        if not activate:
            return
        active = self.viewer.layers.selection.active
        if shapes is not None and active is shapes and shapes.mode != "pan_zoom":
            return  # drawing ellipses: keep drawing, in the new class
        layer = self.lesion_layer(les.code)
        if layer is not None:
            mode = active.mode if isinstance(active, Labels) and layer_role(active) == "lesion" else None
            self.viewer.layers.selection.active = layer
            if mode in ("paint", "erase", "fill"):
                layer.mode = mode

    def start_ellipse(self) -> None:
        shapes = self.ellipses_layer
        if shapes is None:
            return
        self.viewer.layers.selection.active = shapes
        self.set_lesion(self.current, activate=False)
        shapes.mode = "add_ellipse"

    def start_painting(self, mode: str) -> None:
        layer = self.lesion_layer(self.current)
        if layer is None:
            return
        self.viewer.layers.selection.active = layer
        layer.selected_label = lesion(self.current).label
        layer.mode = mode

    def show_changes(self, changes) -> None:
        """Paint the boxes the record changed into the lesion layers (LesionLayers.show_changes)."""
        self.layers.show_changes(changes)

    def _edited(self) -> None:
        """Something of the open image changed: autosave is due."""
        self.autosave.edited()

    # --- refinement ----------------------------------------------------------------------
    def current_ellipses(self) -> dict[str, Ellipse]:
        """{id: Ellipse} as the Shapes layer holds them now (the session's ellipses, brought up to date)."""
        return self.ellipses.current()

    def refine_all(self) -> None:
        self.refinement.refine_all(self.current_ellipses())

    def accept_proposals(self, code: str) -> int:
        """Accept: the pending pixels shown of one lesion class (refined ellipses and finder
        candidates alike) become the grader's own; candidates the threshold hides stay pending.
        Returns the number of proposals accepted."""
        op = self.opened
        if op is None:
            return 0
        rec = op.annotation.record
        changes, n, pixels = [], 0, 0
        for p in list(rec.of_lesion(code)):
            claim = p.claim()
            if not claim.any():
                continue  # below the threshold now: nothing shown to accept
            pixels += int(claim.sum())
            if p.description.get("candidate"):
                rec.decide(p.id, "accepted")  # a verdict, so the review counts show it
            else:
                rec.accept(ids=[p.id])
            changes.append(PixelChange(code, p.box))
            n += 1
        self.show_changes(changes)  # confirmed pixels turn from the lighter to the full colour
        self._edited()
        for finder in self.finders:
            if finder.code == code:
                finder.changed.emit(code)
        name = lesion(code).name
        msg = f"{pixels:,} {name} pixels accepted as yours" if n else f"no pending {name} to accept"
        self.status_label.setText(msg)
        if n:
            show_info(msg)
        return n

    def _on_auto_refine(self, on: bool) -> None:
        self.refinement.enabled = on
        if on:
            self.refinement.sync(self.current_ellipses())

    def _on_superpixels(self, on: bool) -> None:
        self.refinement.superpixels = on

    def _on_threshold(self, value: int) -> None:
        t = value / 100.0
        self.threshold_label.setText(f"threshold {t:.2f}")
        self.refinement.set_threshold(t)

    def _on_model_ready(self, refiner) -> None:
        self.model_label.setText(f"model: refiner {refiner.version}")
        self.superpixel_check.blockSignals(True)
        self.superpixel_check.setChecked(bool(refiner.superpixels))
        self.superpixel_check.blockSignals(False)
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(int(round(refiner.threshold * 100)))
        self.threshold_label.setText(f"threshold {refiner.threshold:.2f}")
        self.threshold_slider.blockSignals(False)

    def _choose_ellipse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import ellipses", "", "Ellipse JSON (*.json)")
        if path:
            self.import_ellipses(path)

    def import_ellipses(self, path: str | Path, refine: bool = False) -> int:
        """Add the ellipses of an ellipse JSON file; "Refine all" (or `refine`) turns them into masks."""
        return self.ellipses.import_file(path, self.current, refine=refine)

    # --- the field of view ------------------------------------------------------------------
    def _on_fov_ready(self, result) -> None:
        """The open image's field of view is known: is it a fundus photograph? The counts follow."""
        op = self.opened
        op.fundus = looks_like_fundus(result[1])
        if self.session.first_notice(op):
            show_info(f"{op.record.image.name} has no circular field of view: it does not look like a "
                      "fundus photograph (the lesion finders will ask before they run)")
        self._update_counts_from_masks()

    # --- counts --------------------------------------------------------------------------
    def _update_counts_from_masks(self) -> None:
        """Counts as % of the field of view, from the writer's copy of the masks (in its thread)."""
        if self.opened is not None:
            self.autosave.count(self.fov, lambda writer, rows: self._signals.counted.emit((writer, rows)))

    def _on_counted(self, result) -> None:
        writer, rows = result
        if writer is self.autosave.writer:
            self._show_counts(rows)

    def _show_counts(self, rows: list[dict]) -> None:
        self.summary = rows
        self.counts.show_counts(rows)

    # --- images of a folder ----------------------------------------------------------------
    def _refresh_list(self) -> None:
        self.image_list.blockSignals(True)
        self.image_list.clear()
        self.image_list.addItems(self.session.image_names())
        self.image_list.setCurrentRow(max(self.index, 0) if self.dataset is not None else 0)
        self.image_list.blockSignals(False)
        self.prev_button.setEnabled(self.session.neighbour(-1) is not None)
        self.next_button.setEnabled(self.session.neighbour(+1) is not None)

    def next_image(self) -> None:
        i = self.session.neighbour(+1)
        if i is not None:
            self.go_to(i)

    def previous_image(self) -> None:
        i = self.session.neighbour(-1)
        if i is not None:
            self.go_to(i)

    def go_to(self, index: int) -> None:
        """Save the current image (in the background) and open another one of the folder."""
        if self.dataset is None or not 0 <= index < len(self.dataset) or self._loading:
            return
        if index == self.index and self.opened is not None:
            return
        for finder in self.finders:  # a run on this image stops, and what it proposed goes before the save
            finder.image_changed()
        if self.opened is not None and (self.has_unsaved_changes() or self.autosave.summary_since is not None):
            self.save(summary=True)  # leaving this image: its overlay and lesion table too
        record = self.dataset.records[index]
        self._loading = True
        self.status_label.setText(f"opening {record.image.name}...")
        dataset, root = self.dataset, self.project_root
        saving = self.autosave.pending()  # saves still being written (this very image's, on A -> B -> A)

        @thread_worker(ignore_errors=True)  # _load_failed reports it, once
        def load():
            for f in saving:  # read the project once its last save is on disk, never half of it
                f.result()
            return open_record(record, project_root=root, dataset=dataset), index

        worker = load()
        worker.returned.connect(self._show_opened)
        worker.errored.connect(self._load_failed)
        worker.start()

    def open_path(self, path: str | Path) -> None:
        """Open an image or a folder in this dock (used by the CLI)."""
        path = Path(path)
        if path.is_dir():
            ds = open_dataset(path)
            if ds is None:
                show_error(f"{path}: no fundus images found")
                return
            self.dataset, self.index, self.opened = ds, -1, None
            self.go_to(0)
            return
        ds = open_dataset(path.parent)
        self.dataset = ds
        i = ds.index_of(path) if ds is not None else -1
        if ds is None or i < 0:
            self.dataset = Dataset(path.parent, "flat", [ImageRecord(image=path)])
            i = 0
        self.index = -1
        self.go_to(i)

    def _load_failed(self, exc: Exception) -> None:
        self._loading = False
        waiting, self._reader_waiting = self._reader_waiting, None
        if waiting is not None and waiting in self.viewer.layers:
            QTimer.singleShot(0, lambda: self._switch_to_reader_layers(waiting))
        msg = str(exc) if isinstance(exc, RetinaInputError) else f"cannot open: {exc}"
        show_error(msg)
        self.status_label.setText(msg)

    def _show_opened(self, result: tuple[OpenedImage, int]) -> None:
        """Replace the previous image's layers (its save is already queued)."""
        opened, index = result
        for finder in self.finders:
            finder.image_changed()
        waiting = self._reader_waiting
        waiting_image = layer_image(waiting) if waiting is not None else None
        try:
            for layer in list(self.viewer.layers):
                if layer_role(layer) not in IMAGE_ROLES:
                    continue
                if waiting_image is not None and layer_image(layer) == waiting_image and not self.layers.owns(layer):
                    continue  # what File > Open added meanwhile stays, to be switched to next
                self.viewer.layers.remove(layer)
            self.opened = opened
            self.index = index
            self._adding = True
            try:
                for item in layer_data(opened):
                    self.viewer.add_layer(Layer.create(*item))
            finally:
                self._adding = False
            self.viewer.layers.selection.active = self.lesion_layer(self.current)
            self._ensure_layers()
            self._after_open()
            self.viewer.reset_view()
            self.status_label.setText("restored" if opened.from_project else "new annotation")
            if opened.annotation.notes:  # e.g. a mask of the wrong size, left out: one notification
                show_error("; ".join(opened.annotation.notes))
        finally:
            self._loading = False
            self._reader_waiting = None
        if waiting is not None and waiting in self.viewer.layers:
            QTimer.singleShot(0, lambda: self._switch_to_reader_layers(waiting))

    # --- saving --------------------------------------------------------------------------
    def _ellipse_dicts(self) -> list[dict]:
        return [e.to_dict() for e in self._ellipse_file().ellipses]

    def _ellipse_file(self) -> EllipseFile:
        """The open image's ellipses as data, brought up to date from the Shapes layer (their editor)."""
        return self.ellipses.ellipse_file()

    def _grader(self) -> str:
        return self.grader_edit.text().strip() or _user()

    def has_unsaved_changes(self) -> bool:
        """Edits not yet on disk: unsaved in memory, or a save still being written."""
        return self.autosave.has_unsaved_changes(self.opened)

    def autosave_tick(self) -> None:
        """Write what changed once a burst of edits pauses (or at the latest ~1.5 s after it began)."""
        if self._loading:
            return
        try:
            due = self.autosave.due(self.opened, time.monotonic(), busy=self.refinement.busy)
            if due is not None:
                self.save(summary=due == "summary")
        except Exception as e:  # a malformed shape must not stop autosave for good
            self._report_error(f"autosave: {e}")

    def save(self, summary: bool = False) -> Future | None:
        """Queue a save of what changed (plus overlay.png and lesions.csv if `summary`); returns its Future."""
        # recounting lesions can wait while the model has the CPU
        fut = self.autosave.save(self.opened, self._ellipse_file, self._grader(), summary=summary,
                                 counts=not self.refinement.busy)
        if fut is not None:
            self.status_label.setText("saving...")
        return fut

    def _from_writer_thread(self, *result) -> None:
        try:
            self._signals.done.emit(result)
        except RuntimeError:  # the dock was deleted with its window: nothing to show it in
            self.session.disconnect("saved", self._from_writer_thread)

    def _on_saved(self, result) -> None:
        project_dir, rows, error, snap = result
        same = self.opened is not None and self.opened.project_dir == project_dir
        if error is not None:
            if same:  # keep the edits: what this save took is unsaved again, the next tick retries
                self.autosave.give_back(self.opened, snap)
                self._report_error(error)
            else:  # the save of an image left behind: it is no longer open to keep them
                self._report_error(error, kept=False)
            return
        self._last_error = None
        self.last_saved = datetime.now()
        if same:
            self.opened.from_project = True
            self.project_label.setText(f"saved in {project_dir}")
            if rows is not None:
                self._show_counts(rows)
        self.status_label.setText(f"saved {self.last_saved:%H:%M:%S}")

    def _report_error(self, message: str, kept: bool = True) -> None:
        self.status_label.setText(f"NOT SAVED: {message}")
        if message != self._last_error:  # one notification per problem, not one per tick
            advice = ("your edits are kept; choose another project folder" if kept else
                      "the last edits of the image left were not written; open it again to check")
            show_error(f"{message} ({advice})")
            self._last_error = message

    def flush(self, timeout: float = 30.0) -> None:
        """Write everything now, overlay and lesion table included, and wait (closing napari, tests, CLI)."""
        self.autosave.flush(self.opened, self._ellipse_file, self._grader(), timeout=timeout)
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()

    def _choose_project_root(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save annotation projects under")
        if folder:
            self.set_project_root(folder)

    def set_project_root(self, folder: str | Path) -> None:
        """Save this and the following images' projects under `folder` instead."""
        self.project_root = Path(folder)
        op = self.opened
        if op is not None:
            op.project_dir = self.project_root / f"{op.record.image.stem}.retina"
            self.autosave.move_to(op, self._grader())
            self._last_error = None
            self._update_counts_from_masks()
            self.project_label.setText(f"will be saved in {self.opened.project_dir}")
            self.save()

    def closeEvent(self, event) -> None:
        self._timer.stop()
        self.session.disconnect("model", self._on_model_changed)
        self.session.disconnect("saved", self._from_writer_thread)
        for finder in self.finders:  # a run in progress stops with the window
            finder.image_changed()
        try:
            self.flush()
        except Exception as e:
            show_error(f"saving on close failed: {e}")
        self.autosave.shutdown()
        super().closeEvent(event)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return ""
