"""Batches gathered by index from a uint8 store: in the training loop when the store is on the training device
(resident), or one batch ahead in a thread on the host when it is not (streamed). Both draw the same order
from the same generator, so a seed gives the same batches either way."""
import queue
import threading

import torch

PREFETCH = 2  # batches gathered ahead of the one being trained on


class IndexBatches:
    """(x, y) of rows store[index[i]]; shuffling draws one permutation per epoch on the store's device."""

    def __init__(self, store: torch.Tensor, index: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool):
        self.store, self.index, self.y = store, index, y
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        return torch.randperm(len(self.y), device=self.y.device) if self.shuffle else None

    def _batches(self, order: torch.Tensor | None):
        for start in range(0, len(self.y), self.batch_size):
            pick = slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
            yield self.store.index_select(0, self.index[pick]), self.y[pick]

    def __iter__(self):
        return self._batches(self._order())


class StreamedBatches(IndexBatches):
    """The same batches, gathered from a host store (a mapped file: pages are read as rows are asked for) by a
    thread that stays PREFETCH batches ahead; pinned, so the copy to a GPU can run without blocking."""

    def __init__(self, store, index, y, batch_size: int, shuffle: bool, pin: bool = False):
        super().__init__(store, index, y, batch_size, shuffle)
        self.pin = pin

    def __iter__(self):
        # Drawn now, in the caller's thread, when iter() is called: the same random stream as IndexBatches.
        return self._stream(self._order())

    def _stream(self, order: torch.Tensor | None):
        ready: queue.Queue = queue.Queue(PREFETCH)
        stop = threading.Event()

        def gather():
            try:
                for x, y in self._batches(order):
                    if self.pin:
                        x, y = x.pin_memory(), y.pin_memory()
                    while not stop.is_set():
                        try:
                            ready.put((x, y), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
                ready.put(err)

        thread = threading.Thread(target=gather, name="lab-batches", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # an epoch left early (max_steps, an interrupt): the gatherer stops within 0.1 s
            stop.set()
            thread.join()
