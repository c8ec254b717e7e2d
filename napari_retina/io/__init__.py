"""Reading and writing fundus images, lesion masks, ellipses and annotation projects."""

from .errors import RetinaInputError

__all__ = ["RetinaInputError"]
