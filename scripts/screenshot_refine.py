"""Make docs/refine.png (and docs/find_exudates.png) from a real napari window, as a grader works.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_refine.py \\
        [--refiner DIR] [--exudates DIR] [--out-dir docs]

The IDRiD sample image is opened on its own (a copy in a temporary folder, so that its
ground-truth masks stay out of the picture). refine.png: one large ellipse drawn around the
exudate cluster temporal to the optic disc (centre x 2146, y 1270, semi-axes 324 x 193), as a
grader circles a cluster, plus coarse ellipses simulated from the sample's HE masks nearby;
every lesion pixel shown is the model's. find_exudates.png (with an exudate model): "Find
exudates" on the same image, its overlay and its candidates in the EX layer. Prints what it
measured (pixels inside the cluster ellipse against the sample's own EX mask).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from napari_retina.coarse import simulate_coarse_ellipses
from napari_retina.io.ellipses import Ellipse, ellipse_to_corners, rasterize_ellipse
from napari_retina.io.masks import read_mask
from napari_retina.sample_data import idrid_sample_masks
from _window import ROOT, annotator_window, sample_copy, settle, wait

CLUSTER = Ellipse("EX", (2146.0, 1270.0), (324.0, 193.0), 0.0)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--refiner", help="refiner model folder (default: the shipped one)")
p.add_argument("--exudates", help="exudate model folder (default: the shipped one, if any)")
p.add_argument("--out-dir", default=str(ROOT / "docs"))
a = p.parse_args()
out_dir = Path(a.out_dir)
image = sample_copy()
viewer, widget, app = annotator_window(image, model_dir=a.refiner, exudate_model_dir=a.exudates)


wait(lambda: widget.ellipses_layer is not None and widget.refinement.refiner is not None)
refined = []
widget.refinement.refined.connect(lambda eid, s: refined.append(eid))
ellipses = [CLUSTER]
masks = {c: read_mask(pth) for c, pth in idrid_sample_masks().items()}
for e in simulate_coarse_ellipses(masks["HE"], "HE", seed=0):
    x, y = e.center_xy
    if abs(y - 1300) < 450 and abs(x - 2150) < 650:
        ellipses.append(e)
for e in ellipses:
    widget.set_lesion(e.lesion, activate=False)
    widget.ellipses_layer.add(ellipse_to_corners(e), shape_type="ellipse")
wait(lambda: len(set(refined)) >= len(ellipses))
ex = widget.lesion_layer("EX").data != 0
inside = rasterize_ellipse(CLUSTER, ex.shape)
gt = masks["EX"]
iou = (ex & gt & inside).sum() / max(((ex | gt) & inside).sum(), 1)
print(f"cluster ellipse: {int((ex & inside).sum())} model px, {int((gt & inside).sum())} exudate px inside, IoU {iou:.2f}")
widget.set_lesion("EX")
viewer.layers.selection.active = widget.ellipses_layer
viewer.camera.center = (1300.0, 2150.0)
viewer.camera.zoom = 0.9
settle()
Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))).convert("RGB").save(out_dir / "refine.png")
print(f"wrote {out_dir / 'refine.png'}: {len(ellipses)} ellipses refined")

finder = widget.exudate_finder
done = []
finder.finished.connect(done.append)
finder.find_button.click()
wait(lambda: done or not finder.running and "tile" not in finder.status.text() and finder.status.text() != "", 300)
if done:
    widget.ellipses_layer.visible = False
    viewer.camera.center = (1424.0, 2144.0)
    viewer.camera.zoom = 0.22
    settle()
    Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))).convert("RGB").save(
        out_dir / "find_exudates.png")
    print(f"wrote {out_dir / 'find_exudates.png'}: {finder.status.text()}")
else:
    print(f"no exudate screenshot: {finder.status.text()}")
widget.flush()
widget._timer.stop()
viewer.close()
