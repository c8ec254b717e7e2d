"""Make docs/find_microaneurysms.png from a real napari window, as a grader works.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_ma.py \\
        [--model DIR] [--out docs/find_microaneurysms.png]

The IDRiD sample (a copy alone in a temporary folder, so its ground-truth masks stay out of the
picture) is opened, "Find microaneurysms" runs, and Review steps to the most probable
candidate, zoomed in as the grader sees it. Prints the candidates found, the seconds, and how
many of them touch a microaneurysm of the sample's own mask (the sample is one of the
validation images of the shipped detector).
"""

import argparse
import time

import numpy as np
from PIL import Image

from napari_retina.io.masks import read_mask
from napari_retina.metrics import label_lesions
from napari_retina.sample_data import idrid_sample_masks
from _window import ROOT, annotator_window, sample_copy, settle, wait

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", help="microaneurysm detector folder (default: the version in use)")
p.add_argument("--out", default=str(ROOT / "docs" / "find_microaneurysms.png"))
a = p.parse_args()
image = sample_copy()
viewer, widget, app = annotator_window(image, ma_model_dir=a.model)


wait(lambda: widget.opened is not None and widget.ellipses_layer is not None)
finder = widget.ma_finder
done = []
finder.finished.connect(done.append)
t0 = time.monotonic()
finder.find_button.click()
busy = ("tile", "segmenting", "loading", "cancelling")
wait(lambda: done or (not finder.running and finder.status.text() and not finder.status.text().startswith(busy)), 300)
if not done:
    raise SystemExit(f"no detector: {finder.status.text()}")
seconds = time.monotonic() - t0
mask = widget.lesion_layer("MA").data != 0
gt = read_mask(idrid_sample_masks()["MA"])
labels, n = label_lesions(mask)
hit = len(np.unique(labels[gt & (labels > 0)]))
print(f"{n} candidate lesions proposed in {seconds:.0f} s; {hit} touch a microaneurysm of the sample's mask "
      f"({len(np.unique(label_lesions(gt)[0][gt & mask])) if n else 0} of {label_lesions(gt)[1]} microaneurysms found)")
widget.ma_review.review_button.click()  # the most probable candidate, zoomed in
settle(80)
Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))).convert("RGB").save(a.out)
print(f"wrote {a.out}: {finder.status.text()}; review: {widget.ma_review.counts_label.text()}")
widget.flush()
widget._timer.stop()
viewer.close()
