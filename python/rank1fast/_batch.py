"""One forward pass's inputs: padded token ids, which rows are real, and where they go.

Shared by :mod:`rank1fast.collect` (which also keeps what its hooks record in a batch) and
:mod:`rank1fast.corrections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Batch:
    """One forward pass: the padded inputs, which rows are real, and what the hooks kept."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    index: torch.Tensor  # flat indices of real tokens in [B*T]
    position: torch.Tensor  # [n] int32
    document: torch.Tensor  # [n] int64
    token: torch.Tensor  # [n] int32, the token ids
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    device_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # statistics=True
    event: Any = None  # CUDA event after which the host copies are complete

    @property
    def tokens(self) -> int:
        return int(self.position.shape[0])

    def cut(self, n: int) -> None:
        """Keep the first ``n`` tokens (document order)."""
        self.position = self.position[:n]
        self.document = self.document[:n]
        self.token = self.token[:n]
        self.tensors = {k: v[:n] for k, v in self.tensors.items()}


def make_batch(rows: list[tuple[int, list[int]]], pad_id: int) -> Batch:
    import torch

    lengths = [len(seq) for _, seq in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, (_, seq) in enumerate(rows):
        input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[r, : len(seq)] = 1
    index = mask.flatten().nonzero().squeeze(1)
    position = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
    document = torch.cat(
        [torch.full((n,), d, dtype=torch.int64) for (d, _), n in zip(rows, lengths, strict=True)]
    )
    token = torch.cat([torch.tensor(seq, dtype=torch.int32) for _, seq in rows])
    return Batch(input_ids, mask, index, position, document, token)


def input_device(model: nn.Module) -> torch.device:
    import torch

    embeddings = None
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            embeddings = getter()
        except (NotImplementedError, AttributeError):
            embeddings = None
    for p in (embeddings if embeddings is not None else model).parameters():
        return p.device
    return torch.device("cpu")
