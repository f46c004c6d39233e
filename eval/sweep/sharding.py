"""Data-parallel sharding of a sweep through accelerate (``torchrun`` / ``accelerate launch``)."""
from __future__ import annotations

import os

# ----------------------------------------------------------------------------------------------------
# Sharding


class DataParallel:
    def __init__(self, shard_by: str, device: str):
        if shard_by not in ("auto", "accelerate", "none"):
            raise ValueError(f"shard_by must be 'auto', 'accelerate' or 'none', got {shard_by!r}")
        use = shard_by == "accelerate" or (shard_by == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1)
        self.state = None
        self.rank, self.world = 0, 1
        if use:
            from accelerate import PartialState

            cpu = device == "cpu" or (device == "auto" and not _cuda_available())
            self.state = PartialState(cpu=cpu)
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str):
        import torch

        if self.state is not None and device in ("auto", "cuda") and self.state.device.type == "cuda":
            return self.state.device
        if device == "auto":
            return torch.device("cuda" if _cuda_available() else "cpu")
        return torch.device(device)

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


