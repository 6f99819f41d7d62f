"""The training batches of consecutive optimiser steps through a torch DataLoader (worker processes read the
slices, pinned memory on CUDA), in exactly the order ``DataOrder`` gives, so a resumed run sees the same data."""
import sys

import torch
from torch.utils.data import DataLoader, Dataset


class StepBatches(Dataset):
    """Item k = (images (B, C, S, S) float32, label maps (B, S, S) int64) of training step ``first_step + k``."""

    def __init__(self, images, label_maps, data_order, first_step: int):
        self.images, self.label_maps, self.data_order, self.first_step = images, label_maps, data_order, first_step

    def __len__(self) -> int:
        return sys.maxsize - self.first_step       # unbounded: the sampler's range is lazy

    def __getitem__(self, k: int):
        batch = self.data_order.batch_indices(self.first_step + k)
        return torch.from_numpy(self.images[batch]), torch.from_numpy(self.label_maps[batch])


class StepLoader:
    """``batch(step)``: the batch of ``step``; consecutive steps come from one DataLoader that prefetches ahead,
    another step (a resume, a benchmark restarting at 0) starts a new one there."""

    def __init__(self, images, label_maps, data_order, num_workers: int = 0, pin_memory: bool = False,
                 step_batches=StepBatches):
        self.images, self.label_maps, self.data_order = images, label_maps, data_order
        self.step_batches = step_batches      # the Dataset class of the batches (inpainting: crops)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._iterator, self._next_step = None, None

    def batch(self, step: int):
        if self._iterator is None or step != self._next_step:
            loader = DataLoader(self.step_batches(self.images, self.label_maps, self.data_order, step), batch_size=None,
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=4 if self.num_workers else None)
            self._iterator = iter(loader)
        self._next_step = step + 1
        return next(self._iterator)
