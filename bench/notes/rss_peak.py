"""Where a compress run's peak RSS happens: runs `llmpress compress ...` in this process while a
thread reads /proc/self/status every 2 ms and, at each new maximum, records the resident set split
into anonymous and file-backed pages and the main thread's Python stack at that moment.

Written when issue #2's 1.3 GB bar was missed in some runs of the same command and met in others
(the heap's free space, docs/pipeline.md "Memory"); it shows which step holds the peak of a run.
Linux only. Prints the peak as JSON; --json also writes the RSS timeline (one sample a second,
each with the step the progress bar names then) and the largest RSS seen within each block.

    python bench/notes/rss_peak.py [--json OUT] -- smollm2-135m --recipe gptq-w4-g64 --out DIR --overwrite --no-progress
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback


def _status_mb() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` and ``RssShmem`` of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


class PeakSampler(threading.Thread):
    """Samples RSS every ``interval`` seconds; ``peak`` holds the largest sample and its stack."""

    def __init__(self, interval: float = 0.002, frames: int = 10):
        super().__init__(daemon=True)
        self.interval, self.frames = interval, frames
        self.main = threading.main_thread().ident
        self.peak: dict = {"VmRSS": 0}
        self.timeline: list[tuple[float, int, int, str]] = []   # (seconds, VmRSS, RssAnon, step), one a second
        self.step = "start"                  # what the pipeline's progress bar last described
        self.block_peaks: dict[str, int] = {}   # "block N" -> the largest VmRSS seen while it ran
        self.stop = threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            sample = _status_mb()
            now = round(time.perf_counter() - self.start_time, 2)
            if not self.timeline or now - self.timeline[-1][0] >= 1.0:
                self.timeline.append((now, sample["VmRSS"], sample["RssAnon"], self.step))
            block = " ".join(self.step.split()[:2]) if self.step.startswith("block") else self.step
            self.block_peaks[block] = max(self.block_peaks.get(block, 0), sample["VmRSS"])
            if sample["VmRSS"] > self.peak["VmRSS"]:
                frame = sys._current_frames().get(self.main)
                stack = traceback.format_stack(frame, limit=self.frames) if frame is not None else []
                del frame   # a kept frame would keep its locals (the batch's tensors) alive: RSS it measures
                self.peak = {**sample, "seconds": now, "step": self.step,
                             "stack": [" ".join(s.split()) for s in stack]}
            time.sleep(self.interval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("compress_args", nargs=argparse.REMAINDER, help="the arguments of `llmpress compress`, after --")
    args = ap.parse_args()
    compress_args = args.compress_args[1:] if args.compress_args[:1] == ["--"] else args.compress_args
    sampler = PeakSampler()
    sampler.start()
    from llmpress.cli import app
    from llmpress.compress import pipeline

    describe = pipeline.Progress.describe

    def traced(self, text: str) -> None:   # the step names of the progress bar, also with --no-progress
        sampler.step = text
        describe(self, text)

    pipeline.Progress.describe = traced

    try:
        app(["compress", *compress_args], standalone_mode=False)
    finally:
        sampler.stop.set()
        sampler.join()
        print(json.dumps(sampler.peak, indent=1, ensure_ascii=False))
        if args.json:   # with the timeline: (seconds, VmRSS MB, RssAnon MB, step) once a second
            with open(args.json, "w") as f:
                json.dump({"peak": sampler.peak, "block_peaks": sampler.block_peaks, "timeline": sampler.timeline}, f)
        print("largest VmRSS (MB) per step:", " ".join(f"{k.removeprefix('block ')}:{v}" for k, v in sampler.block_peaks.items()))


if __name__ == "__main__":
    main()
