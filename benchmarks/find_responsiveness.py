"""Does the napari window stay responsive while "Find exudates" (or microaneurysms) runs on a full photograph?

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/find_responsiveness.py [--runs 3] [--lesion EX|MA] [--model DIR]

Opens the shipped IDRiD sample (4288 x 2848, a copy on its own, autosave on) in a real napari
window with the annotator dock (its ellipse refiner loaded first, as in a grader's session), clicks "Find exudates" ("Find microaneurysms" with --lesion MA)
and, while the model runs in its worker
thread, measures the GUI thread: a 10 ms Qt timer records every gap between its ticks (a gap
of g ms means the event loop could not react for about g ms: a grader's click or pan waits that
long). Prints per run: seconds to the first candidates in the lesion's layer (exudates: blocks
proposed while the model runs; microaneurysms: candidates come at the end), seconds to the end,
the proposals made, the median, 95th percentile and longest gap, and the number of gaps over
100 ms, then the machine and the command. Pause other work on the machine while measuring.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lesion", choices=["EX", "MA"], default="EX")
    p.add_argument("--model", "--exudates", dest="model", help="model folder (default: the shipped one)")
    a = p.parse_args()

    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_retina.widgets.annotator import LesionAnnotator

    tmp = Path(tempfile.mkdtemp())
    image = tmp / "IDRiD_22.jpg"
    shutil.copy(ROOT / "napari_retina" / "samples" / "IDRiD_22.jpg", image)
    viewer = napari.Viewer(title="napari-retina")
    viewer.window._qt_window.resize(1500, 950)
    dirs = {"exudate_model_dir" if a.lesion == "EX" else "ma_model_dir": a.model}
    # as a grader's session: the ellipse refiner loads at once (it also sets torch to half the cores)
    widget = LesionAnnotator(viewer, **dirs)
    viewer.window.add_dock_widget(widget, name="Lesion annotator")
    widget.open_path(image)

    def wait(cond, seconds=600):
        # a real event loop, as napari runs: processEvents() alone never runs Qt's deferred
        # deletes, so napari's "in progress" animation would never stop between runs
        if cond():
            return
        end = time.monotonic() + seconds
        loop, check = QEventLoop(), QTimer()
        check.setInterval(5)
        check.timeout.connect(lambda: loop.quit() if cond() or time.monotonic() > end else None)
        check.start()
        loop.exec()
        check.stop()
        if not cond():
            raise SystemExit(f"timed out after {seconds} s")

    wait(lambda: widget.opened is not None and (widget.refinement.refiner is not None or bool(widget.refinement.model_error)))
    finder = widget.exudate_finder if a.lesion == "EX" else widget.ma_finder
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    print(f"{finder.find_button.text()} on {image.name}, {os.cpu_count()} CPUs")
    print("| run | first candidates (s) | done (s) | proposals | median gap (ms) | p95 gap (ms) | longest gap (ms) | gaps > 100 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for run in range(1, a.runs + 1):
        done, first = [], []
        finder.finished.connect(lambda code: done.append(time.perf_counter()))

        known = {q.id for q in finder.proposals()}  # an earlier run's candidates do not count

        def on_block(payload, first=first, known=known):
            if not first and any(q.id not in known for q in finder.proposals()):
                first.append(time.perf_counter())
        finder._signals.block.connect(on_block)
        ticks.clear()
        timer.start()
        t0 = time.perf_counter()
        finder.find_button.click()
        wait(lambda: done or (not finder.running and finder.status.text().startswith(("cancelled", "no "))))
        timer.stop()
        finder._signals.block.disconnect(on_block)
        finder.finished.disconnect()
        if not done:
            print(f"run {run}: {finder.status.text()}")
            return 1
        if not first and finder.proposals():  # microaneurysm candidates come all at once, at the end
            first.append(done[0])
        gaps = np.diff(np.array([t0] + ticks + [done[0]])) * 1000
        print(f"| {run} | {first[0] - t0 if first else float('nan'):.1f} | {done[0] - t0:.1f} | {len(finder.proposals())} | "
              f"{np.median(gaps):.0f} | {np.percentile(gaps, 95):.0f} | {gaps.max():.0f} | {(gaps > 100).sum()} |")
        widget.flush()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; command: "
          f"xvfb-run -a -s \"-screen 0 1600x1000x24\" .venv/bin/python benchmarks/find_responsiveness.py {' '.join(sys.argv[1:])}")
    widget.flush()
    widget._timer.stop()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
