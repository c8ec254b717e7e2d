"""Write one box of pixels into a napari Labels layer and redraw only that box.

napari's public `Labels.data_setitem` redraws just the changed region, but it also puts the
change into the grader's undo history and emits a paint event: model proposals would then be
undone by Ctrl+Z and counted as brush strokes, and every threshold tick would grow the history.
So the box is written into the data directly and napari's own partial redraw (the one
`data_setitem` and the brush use) is asked for that box; where this napari lacks it, the
whole layer is refreshed instead.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels

from ..proposals import PixelChange


def write_box(layer: Labels, change: PixelChange, shown: np.ndarray, hand: np.ndarray, label: int,
              pending_label: int) -> None:
    """Make `layer`'s pixels in `change.box` show the record: `label` where the grader's own
    (`hand`), `pending_label` where only a proposal claims them (`shown` and not `hand`), 0 elsewhere.
    `shown` and `hand` are the box's pixels (box-sized)."""
    sl = change.slices
    region = layer.data[sl]  # a view: napari keeps NumPy label data as given
    want_on = shown
    want_hand = hand & want_on
    on = region != 0
    pending = region == pending_label
    # touch only pixels whose state differs: a grader's other label values stay as painted
    region[want_hand & (~on | pending)] = label
    region[want_on & ~want_hand & (region != pending_label)] = pending_label
    region[~want_on & on] = 0
    redraw_box(layer, sl)


def redraw_box(layer: Labels, sl: tuple[slice, slice]) -> None:
    """Show `layer.data[sl]`, changed in place, without recolouring the whole image."""
    try:
        image = layer._slice.image
        if layer.ndim != 2 or layer.multiscale or image.raw.shape != layer.data.shape:
            raise AttributeError("not a plain 2-D layer")
        if not np.shares_memory(image.raw, layer.data):
            image.raw[sl] = layer.data[sl]
        image.view[sl] = layer._raw_to_displayed(image.raw, sl)
        layer._accumulate_updated_slice(sl)
        layer._partial_labels_refresh()
    except AttributeError:  # a napari without partial redraws: correct, only slower
        layer.refresh()
