"""The one lesion table: every part of napari-retina reads lesion classes from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Lesion:
    code: str  # IDRiD file suffix, e.g. "EX" in IDRiD_01_EX.tif
    name: str
    colour: str  # hex RGB used for the Labels layer, the ellipses and overlay.png
    label: int  # value of the lesion's pixels in its napari Labels layer
    idrid_folder: str  # sub-folder of "2. All Segmentation Groundtruths/<split>/"
    shortcut: str  # napari key binding that makes this lesion the active class

    @property
    def pending_label(self) -> int:
        """Value of a model's pending (not yet accepted) pixels in the lesion's Labels layer."""
        return self.label + PENDING_OFFSET

    @property
    def suffix(self) -> str:
        return f"_{self.code}"

    @property
    def layer_name(self) -> str:
        return f"{self.code} {self.name}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        h = self.colour.lstrip("#")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))

    def mask_filename(self, stem: str) -> str:
        return f"{stem}_{self.code}.tif"


# A lesion's Labels layer holds two values: `label` for the grader's confirmed pixels (painted or
# accepted) and `label + PENDING_OFFSET` for model proposals still pending, drawn lighter so the
# grader tells them apart at a glance. Only confirmed pixels are saved as masks.
PENDING_OFFSET = 10

LESIONS: tuple[Lesion, ...] = (
    Lesion("EX", "hard exudates", "#ffd400", 1, "3. Hard Exudates", "Alt-1"),
    Lesion("HE", "haemorrhages", "#ff2a2a", 2, "2. Haemorrhages", "Alt-2"),
    Lesion("MA", "microaneurysms", "#00e5ff", 3, "1. Microaneurysms", "Alt-3"),
    Lesion("SE", "soft exudates", "#ff8c00", 4, "4. Soft Exudates", "Alt-4"),
    Lesion("OD", "optic disc", "#4f7dff", 5, "5. Optic Disc", "Alt-5"),
)

LESION_CODES: tuple[str, ...] = tuple(l.code for l in LESIONS)

# the lesions that coarse ellipses are simulated for, refined and scored (the paper's four);
# the optic disc is left out: it is segmented whole, not annotated with ellipses
REFINED_LESIONS: tuple[str, ...] = ("MA", "SE", "EX", "HE")

_BY_CODE = {l.code: l for l in LESIONS}


def lesion(code: str) -> Lesion:
    """The lesion for a code such as "EX" (case-insensitive); ValueError names the valid codes."""
    try:
        return _BY_CODE[code.upper()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown lesion {code!r}; expected one of {', '.join(LESION_CODES)}"
        ) from None


def confirmed_pixels(data) -> "np.ndarray":
    """The grader's confirmed pixels of a lesion Labels layer's data (pending proposals left out)."""
    import numpy as np

    data = np.asarray(data)
    return (data != 0) & (data < PENDING_OFFSET)


def lesion_for_layer_name(name: str) -> Lesion | None:
    """The lesion whose layer name ("EX hard exudates") starts `name`, else None."""
    for l in LESIONS:
        if name == l.layer_name or name.startswith(l.layer_name + " "):
            return l
    return None
