"""Loss functions: pure math on tensors, plus thin modules that own the cross-rank gather.

The pure functions never call torch.distributed; they take the local features and the gathered
("all") features. The module wrappers receive a `gather` callable (utils.all_gather_with_grad in
training, the identity in one process), so every formula is testable in a single CPU process.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def contrastive_loss(image_local: torch.Tensor, text_local: torch.Tensor, image_all: torch.Tensor,
                     text_all: torch.Tensor, logit_scale: torch.Tensor, offset: int = 0,
                     label_smoothing: float = 0.0, avg_or_sum: str = "avg") -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021, "Learning Transferable Visual Models...").

    With s = logit_scale, i_b / t_b the L2-normalised embeddings of pair b, and N rows in `*_all`:
        L_img = 1/B sum_b CE_eps(s * i_b @ T_all^T, offset + b)
        L_txt = 1/B sum_b CE_eps(s * t_b @ I_all^T, offset + b)
        loss  = (L_img + L_txt) / 2      ("avg")   or   L_img + L_txt   ("sum")
    where CE_eps is cross-entropy with label smoothing eps: target (1-eps) on the positive plus eps/N
    spread over all N columns (Szegedy et al., 2016). Local-loss layout: each rank scores its B rows
    against all N columns, so the memory is O(B*N), and the labels are offset by rank*B.

    Shapes: image_local/text_local (B, D), image_all/text_all (N, D), logit_scale scalar.
    Returns {"loss", "clip_loss", "clip_acc"} with clip_acc in percent (image->text top-1).
    """
    if avg_or_sum not in ("avg", "sum"):
        raise ValueError(f"avg_or_sum must be 'avg' or 'sum', got {avg_or_sum!r}")
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset  # (B,)
    logits_image = logit_scale * image_local.float() @ text_all.float().t()  # (B, N)
    logits_text = logit_scale * text_local.float() @ image_all.float().t()  # (B, N)
    loss_image = F.cross_entropy(logits_image, labels, label_smoothing=label_smoothing)
    loss_text = F.cross_entropy(logits_text, labels, label_smoothing=label_smoothing)
    clip_loss = (loss_image + loss_text) / 2
    with torch.no_grad():
        acc = (logits_image.argmax(dim=-1) == labels).float().mean() * 100
    return {"loss": clip_loss * (2 if avg_or_sum == "sum" else 1), "clip_loss": clip_loss, "clip_acc": acc}


def identity_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The gather of a single process."""
    return tensor


class ClipLoss(nn.Module):
    """`contrastive_loss` over features gathered across ranks with gradients.

    outputs: {"image_embed" (B,D), "text_embed" (B,D), "logit_scale" ()}. N ranks x B samples give the
    same gradient as one process with N*B samples (DDP averages the N local means).
    """

    def __init__(self, gather: Gather = identity_gather, rank: int = 0, label_smoothing: float = 0.0,
                 avg_or_sum: str = "avg") -> None:
        super().__init__()
        self.gather, self.rank = gather, rank
        self.label_smoothing, self.avg_or_sum = label_smoothing, avg_or_sum

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = outputs["image_embed"], outputs["text_embed"]
        return contrastive_loss(image, text, self.gather(image), self.gather(text), outputs["logit_scale"],
                                offset=self.rank * image.shape[0], label_smoothing=self.label_smoothing,
                                avg_or_sum=self.avg_or_sum)
