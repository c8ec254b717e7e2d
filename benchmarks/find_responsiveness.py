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
import sys
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

    from qtpy.QtCore import QTimer

    sys.path.insert(0, str(ROOT / "scripts"))  # the documentation scripts' window and event loop
    from _window import annotator_window, sample_copy, wait

    image = sample_copy()
    dirs = {"exudate_model_dir" if a.lesion == "EX" else "ma_model_dir": a.model}
    # as a grader's session: the ellipse refiner loads at once (it also sets torch to half the cores)
    viewer, widget, _ = annotator_window(image, **dirs)

    wait(lambda: widget.opened is not None and (widget.refinement.refiner is not None or bool(widget.refinement.model_error)),
         600)
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
        wait(lambda: done or (not finder.running and finder.status.text().startswith(("cancelled", "no "))), 600)
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
