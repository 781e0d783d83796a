"""Gathering a batch whose groups are spread over several processes (torch.distributed).

Group statistics need every sample of a group, but data-parallel training puts a prompt's samples
on different ranks. `gather_batch` all-gathers rewards and group ids (padding to the largest
rank, since ranks may hold different numbers of rows), concatenates them in rank order and says
which rows are this rank's. Every rank then holds the identical global batch, so the
(deterministic) advantage engine gives every rank bitwise identical statistics.

Cost: one all_gather of the row counts (its result is read on the host: one sync on CUDA), then
one all_gather each for the rewards and the ids.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GatheredBatch(NamedTuple):
    rewards: Tensor  # every rank's rows, in rank order
    group_ids: Tensor
    rows: slice  # this rank's rows within the gathered batch


def _require_initialized() -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "sfgrpo: gather=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group(...)); drop gather=True for a single process"
        )


def _all_gather_padded(tensor: Tensor, counts: list[int], group) -> Tensor:
    """all_gather of `[n_r, ...]` tensors with per-rank n_r, concatenated without the padding."""
    longest = max(counts)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_batch(rewards: Tensor, group_ids: Tensor, process_group=None) -> GatheredBatch:
    """All ranks' `rewards` and `group_ids` (rank order) and this rank's slice of them.

    Every rank of `process_group` (default: the world) must call this with tensors of the same
    dtype and trailing shape; the number of rows may differ from rank to rank (or be 0).
    """
    _require_initialized()
    world = torch.distributed.get_world_size(process_group)
    rank = torch.distributed.get_rank(process_group)
    count = torch.tensor([rewards.shape[0]], dtype=torch.int64, device=rewards.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count, group=process_group)
    counts = [int(c) for c in counts]
    all_rewards = _all_gather_padded(rewards.contiguous(), counts, process_group)
    all_ids = _all_gather_padded(group_ids.contiguous(), counts, process_group)
    start = sum(counts[:rank])
    return GatheredBatch(all_rewards, all_ids, slice(start, start + counts[rank]))
