"""Peak memory while a block runs: CUDA's allocator peak on GPU, the sampled resident set size on CPU.

Owns: ``PeakMemory``, the meter behind ``efficiency.json``'s ``peak_memory_bytes`` (and the DP overhead benchmark's
memory column). ``ru_maxrss`` would report the whole process's lifetime peak, wrong for the second run of a sweep,
so on CPU a thread samples ``/proc/self/statm``.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak on GPU, sampled resident set size on CPU.

    ``ru_maxrss`` would report the whole process's lifetime peak, wrong for the second run of a sweep.
    """

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the lifetime peak
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(rss if sys.platform == "darwin" else rss * 1024)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
