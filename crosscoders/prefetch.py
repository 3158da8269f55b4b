"""Batches prepared ahead of the training step, in a background thread.

Reading a batch from the store (memory-mapped rows, bf16 -> fp32, the scales, a checksum when a shard is
first met) and checking it costs CPU time that would otherwise sit between two GPU steps. `Prefetcher`
runs the batch iterator `depth` batches ahead on a thread; where the target is CUDA it puts each batch in
pinned (page-locked) memory there, so the training thread's copy is asynchronous (`non_blocking=True`)
and overlaps the step before. The order is the iterator's: the batches, and a resumed run's batches, are
the ones the loop would read itself. An exception raised by the iterator (a damaged shard, a batch of
NaN) is raised by `next()` at the batch where it happened.

The iterator runs on another thread: a batch source must not draw from torch's global RNG (the sources
here use their own seeded generators), whose state the checkpoint saves.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

_END = object()


class Prefetcher(Iterator[Tensor]):
    def __init__(self, batches: Iterable[Tensor], device: str | torch.device, depth: int = 2,
                 prepare: Callable[[Tensor, int], Tensor] | None = None):
        """`prepare(x, i)`: run on the thread on the i-th batch (checks, conversion) before it is queued."""
        self.device = torch.device(device)
        # pinning needs a CUDA driver; on a machine without one it would fail, and it buys nothing for the CPU
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = iter(batches)
        self._thread = threading.Thread(target=self._run, args=(prepare,), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, prepare) -> None:
        try:
            for i, x in enumerate(self._source):
                x = torch.as_tensor(x)
                if prepare is not None:
                    x = prepare(x, i)
                if self.pin and x.device.type == "cpu":
                    x = x.pin_memory()
                if not self._put(x):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the training thread, raised at this batch
            self._put(e)

    def __next__(self) -> Tensor:
        item = self._queue.get()
        if item is _END:
            self._put(_END)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, torch.float32, non_blocking=self.pin)

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading) and close the iterator; idempotent."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        if hasattr(self._source, "close"):
            self._source.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
