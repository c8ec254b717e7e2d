"""The lesion count table of the annotator dock, with one *reviewed* tick per lesion class.

Counts are connected lesions (8-connectivity) and area in % of the field of view, as the
project's writer computes them (lesions.csv); the tick marks a lesion class of the open image
as reviewed, which makes its confirmed pixels a label for retraining.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QHeaderView, QSizePolicy, QTableWidget, QTableWidgetItem

from ..lesions import LESIONS

REVIEWED_COLUMN = 3


class LesionCounts(QTableWidget):
    """The lesion count table, always tall enough for all its rows (the dock scrolls instead)."""

    reviewed_toggled = Signal(str, bool)  # lesion code, ticked: the grader's click

    def __init__(self):
        super().__init__(len(LESIONS), 4)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(self.sizePolicy().horizontalPolicy(), QSizePolicy.Policy.Fixed)
        self.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)  # rows as tall as the text
        self.setHorizontalHeaderLabels(["lesion", "count", "% of FOV", "reviewed"])
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        for i, les in enumerate(LESIONS):
            item = QTableWidgetItem(les.layer_name)
            item.setForeground(QColor(les.colour))
            self.setItem(i, 0, item)
            self.setItem(i, 1, QTableWidgetItem("0"))
            self.setItem(i, 2, QTableWidgetItem("0"))
            # one click marks this lesion of this image as reviewed: its mask becomes a training label
            check = QTableWidgetItem("")
            check.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
            check.setCheckState(Qt.CheckState.Unchecked)
            check.setToolTip(f"{les.name}: reviewed (the mask is a label for retraining)")
            self.setItem(i, REVIEWED_COLUMN, check)
        self.itemChanged.connect(self._on_item)

    def show_counts(self, rows: list[dict]) -> None:
        for i, row in enumerate(rows):
            self.item(i, 1).setText(str(row["count"]))
            self.item(i, 2).setText(f"{row['area_pct_fov']:.3f}")

    def show_reviewed(self, reviewed: set[str]) -> None:
        self.blockSignals(True)
        try:
            for i, les in enumerate(LESIONS):
                state = Qt.CheckState.Checked if les.code in reviewed else Qt.CheckState.Unchecked
                self.item(i, REVIEWED_COLUMN).setCheckState(state)
        finally:
            self.blockSignals(False)

    def _on_item(self, item) -> None:
        if item.column() == REVIEWED_COLUMN:
            self.reviewed_toggled.emit(LESIONS[item.row()].code, item.checkState() == Qt.CheckState.Checked)

    # --- height: every row shown -----------------------------------------------------------------
    def _rows_height(self) -> int:
        header = self.horizontalHeader()
        header_h = header.height() if header.isVisible() and header.height() > 0 else header.sizeHint().height()
        return header_h + self.verticalHeader().length() + 2 * self.frameWidth()

    def changeEvent(self, event) -> None:
        # napari's style sheet arrives when the dock is added: follow the new row and header heights
        if event.type() in (QEvent.Type.StyleChange, QEvent.Type.FontChange):
            self.updateGeometry()
        super().changeEvent(event)

    def sizeHint(self):
        hint = super().sizeHint()
        hint.setHeight(self._rows_height())
        return hint

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        hint.setHeight(self._rows_height())
        return hint
