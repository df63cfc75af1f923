"""Which train pairs each optimizer step reads: seeded epochs, resumable from a checkpoint."""

from __future__ import annotations

import torch


class PairSampler:
    """Seeded epochs over the train pairs, `batch_size` pairs per step (the whole set if it is smaller)."""

    def __init__(self, num_pairs: int, batch_size: int, seed: int):
        self.num_pairs, self.batch_size = num_pairs, min(batch_size, num_pairs)
        self.generator = torch.Generator().manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self):
        while len(self.queue) < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.num_pairs, generator=self.generator)])
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return batch

    def state_dict(self) -> dict:
        """The position in the epoch order: the generator's state and the pairs still queued."""
        return {"generator": self.generator.get_state(), "queue": self.queue.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.queue = state["queue"].clone()
