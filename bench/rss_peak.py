"""Where a compress run's peak RSS happens: runs `llmpress compress ...` in this process while a
thread reads /proc/self/status every 2 ms and, at each new maximum, records the resident set split
into anonymous and file-backed pages and the main thread's Python stack at that moment.

Issue #2's 1.3 GB bar is missed in some runs of the same command and met in others; this shows
which step holds the peak in each run. Linux only. Prints the peak as JSON; --json also writes
the RSS timeline (one sample a second).

    python bench/rss_peak.py [--json OUT] -- smollm2-135m --recipe gptq-w4-g64 --out DIR --overwrite --no-progress
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
        self.timeline: list[tuple[float, int, int]] = []   # (seconds, VmRSS, RssAnon), one a second
        self.stop = threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            sample = _status_mb()
            now = round(time.perf_counter() - self.start_time, 2)
            if not self.timeline or now - self.timeline[-1][0] >= 1.0:
                self.timeline.append((now, sample["VmRSS"], sample["RssAnon"]))
            if sample["VmRSS"] > self.peak["VmRSS"]:
                frame = sys._current_frames().get(self.main)
                stack = traceback.format_stack(frame, limit=self.frames) if frame is not None else []
                self.peak = {**sample, "seconds": now,
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

    try:
        app(["compress", *compress_args], standalone_mode=False)
    finally:
        sampler.stop.set()
        sampler.join()
        print(json.dumps(sampler.peak, indent=1, ensure_ascii=False))
        if args.json:   # with the timeline: (seconds, VmRSS MB, RssAnon MB) once a second
            with open(args.json, "w") as f:
                json.dump({"peak": sampler.peak, "timeline": sampler.timeline}, f)


if __name__ == "__main__":
    main()
