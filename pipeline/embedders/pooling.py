"""Pooling: one vector per sequence from a padded batch of hidden states.

Every function takes ``hidden`` (batch, seq, dim) and the attention ``mask`` (batch, seq; 1 for
real tokens) and returns float32 (batch, dim). They locate tokens through the mask, so the
result does not depend on which side the batch was padded on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.job.model_info import Pooling


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens, summed in float32 so long bf16 sequences do not lose precision."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (hidden.to(torch.float32) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real token ([CLS]): position 0 with right padding."""
    first = mask.to(torch.long).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first].to(torch.float32)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token (the EOS the chunker appended): position -1 with left padding."""
    last = mask.shape[1] - 1 - mask.to(torch.long).flip(dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)


POOLERS: dict[Pooling, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "last": last_token_pool,
}
