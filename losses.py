"""Loss functions: pure math on tensors, plus thin modules that own the cross-rank gather.

The pure functions never call torch.distributed; they take the local features and the gathered
("all") features. The module wrappers receive a `gather` callable (utils.all_gather_with_grad in
training, the identity in one process), so every formula is testable in a single CPU process. The chunked
SigLIP loss receives a `shift` callable instead (utils.ring_shift_with_grad: the previous rank's block).
`build_criterion` picks a run's loss module from the model's objective and main.py's flags.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # annotations only
    import argparse

    import registry
    import utils

Gather = Callable[[torch.Tensor], torch.Tensor]
Shift = Callable[[torch.Tensor], torch.Tensor]


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


class CLIPLoss(nn.Module):
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


# --------------------------------------------------------------------------- CLIP🚀 (CL2L) and its family
def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent of (..., N) logits against (...) labels, without gradient."""
    with torch.no_grad():
        return (logits.argmax(dim=-1) == labels).float().mean() * 100


def cl2l_loss(image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
              logit_scale: torch.Tensor, image_strong: torch.Tensor, text_strong: torch.Tensor,
              image_strong_all: torch.Tensor, text_strong_all: torch.Tensor, h_logit_scale: torch.Tensor,
              offset: int = 0, label_smoothing: float = 0.0, avg_or_sum: str = "avg") -> dict[str, torch.Tensor]:
    """CLIP🚀 loss (Fini et al., 2023, "Improved baselines for vision-language pre-training", TMLR).

    Global (weak) pair through the linear projector, scale s, NO label smoothing:
        Lg_i = CE(s * i_b @ T_all^T, y_b),   Lg_t = CE(s * t_b @ I_all^T, y_b)
    Strong views a, c = 1..A through the MLP projector, scale s_h, label smoothing eps, every image view
    against every text view in both directions (A^2 terms each, averaged):
        Ll_i = mean_{a,c} CE_eps(s_h * hi_{b,a} @ HT_all[:, c]^T, y_b),   Ll_t likewise with roles swapped
    Per direction L_i = (Lg_i + A * Ll_i) / (1 + A), L_t likewise; clip_loss = (L_i + L_t) / 2 and
    loss = clip_loss ("avg") or 2 * clip_loss ("sum"). With A = 0 this is exactly CLIP's loss.

    Shapes: image/text (B, D), image_all/text_all (N, D), image_strong/text_strong (B, A, D),
    *_strong_all (N, A, D); all L2-normalised; labels y_b = offset + b (local-vs-all layout).
    """
    if avg_or_sum not in ("avg", "sum"):
        raise ValueError(f"avg_or_sum must be 'avg' or 'sum', got {avg_or_sum!r}")
    B, A = image_strong.shape[0], image_strong.shape[1]
    labels = torch.arange(image.shape[0], device=image.device) + offset  # (B,)
    logits_i = logit_scale * image.float() @ text_all.float().t()  # (B, N)
    logits_t = logit_scale * text.float() @ image_all.float().t()  # (B, N)
    loss_ig, loss_tg = F.cross_entropy(logits_i, labels), F.cross_entropy(logits_t, labels)
    out = {"clip_loss_image_global": loss_ig, "clip_loss_text_global": loss_tg,
           "clip_acc": _accuracy(logits_i, labels), "clip_acc_text_global": _accuracy(logits_t, labels),
           "h_logit_scale": h_logit_scale.detach()}
    loss_i, loss_t = loss_ig, loss_tg
    if A > 0:
        labels_l = labels[:, None, None].expand(B, A, A).reshape(-1)  # (B*A*A,)
        # (B, A, A, N): strong image view a of sample b against strong text view c of every sample
        logits_il = h_logit_scale * torch.einsum("bad,ncd->bacn", image_strong.float(), text_strong_all.float())
        logits_tl = h_logit_scale * torch.einsum("bad,ncd->bacn", text_strong.float(), image_strong_all.float())
        n = logits_il.shape[-1]
        loss_il = F.cross_entropy(logits_il.reshape(-1, n), labels_l, label_smoothing=label_smoothing)
        loss_tl = F.cross_entropy(logits_tl.reshape(-1, n), labels_l, label_smoothing=label_smoothing)
        loss_i, loss_t = (loss_ig + A * loss_il) / (1 + A), (loss_tg + A * loss_tl) / (1 + A)
        out.update(clip_loss_image_local=loss_il, clip_loss_text_local=loss_tl,
                   clip_acc_image_local=_accuracy(logits_il.reshape(-1, n), labels_l),
                   clip_acc_text_local=_accuracy(logits_tl.reshape(-1, n), labels_l))
    clip_loss = (loss_i + loss_t) / 2
    out.update(loss=clip_loss * (2 if avg_or_sum == "sum" else 1), clip_loss=clip_loss,
               clip_loss_image=loss_i, clip_loss_text=loss_t)
    return out


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lamb: float = 5e-3, scale: float = 0.025) -> torch.Tensor:
    """Barlow Twins redundancy reduction (Zbontar et al., 2021, "Barlow Twins", ICML).

    C = z1^T z2 / N (z1, z2 (N, P) batch-normalised by the projector's last BN),
    L = scale * [ sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2 ].
    """
    c = z1.float().t() @ z2.float() / z1.shape[0]  # (P, P)
    diag = torch.diagonal(c)
    return scale * ((diag - 1).pow(2).sum() + lamb * (c.pow(2).sum() - diag.pow(2).sum()))


def barlip_loss(v_image_all: torch.Tensor, v_text_all: torch.Tensor, v_image_strong_all: torch.Tensor,
                v_text_strong_all: torch.Tensor, lamb: float = 5e-3, scale: float = 0.025) -> torch.Tensor:
    """BarLIP (Fini et al., 2023): Barlow Twins between modalities, averaged over the 1 + A^2 pairs
    (global image, global text) and (strong image view a, strong text view c) for all a, c.

    Shapes: v_*_all (N, P) and (N, A, P), gathered over ranks (C is a whole-batch statistic).
    """
    A = v_image_strong_all.shape[1]
    terms = [barlow_twins_loss(v_image_all, v_text_all, lamb, scale)]
    terms += [barlow_twins_loss(v_image_strong_all[:, a], v_text_strong_all[:, c], lamb, scale)
              for a in range(A) for c in range(A)]
    return torch.stack(terms).mean()


def negative_cosine(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SimSiam distance D(p, v) = 2 - 2 * mean_b cos(p_b, stopgrad(v_b)) on (B, P) tensors."""
    return 2 - 2 * F.cosine_similarity(p.float(), v.detach().float(), dim=-1).mean()


def siamlip_loss(p_image: torch.Tensor, p_text: torch.Tensor, v_image: torch.Tensor, v_text: torch.Tensor,
                 p_image_strong: torch.Tensor, p_text_strong: torch.Tensor, v_image_strong: torch.Tensor,
                 v_text_strong: torch.Tensor) -> torch.Tensor:
    """SiamLIP / BYOLIP (Fini et al., 2023): cross-modal SimSiam (Chen & He, 2021) or BYOL (Grill et al.,
    2020, when the targets v come from the momentum network).

        L = [D(p_i, v_t) + D(p_t, v_i) + sum_{a,c} (D(p_i^a, v_t^c) + D(p_t^a, v_i^c))] / (2 + 2 A^2)

    Shapes: p_image, p_text, v_image, v_text (B, P); *_strong (B, A, P). Targets get stop-gradient.
    """
    A = p_image_strong.shape[1]
    total = negative_cosine(p_image, v_text) + negative_cosine(p_text, v_image)
    for a in range(A):
        for c in range(A):
            total = total + negative_cosine(p_image_strong[:, a], v_text_strong[:, c])
            total = total + negative_cosine(p_text_strong[:, a], v_image_strong[:, c])
    return total / (2 + 2 * A * A)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Equipartitioned soft assignments (Cuturi, 2013; Caron et al., 2020, "SwAV", NeurIPS).

    scores (N samples, K prototypes) -> Q (N, K): Q^T starts as exp(scores / epsilon) / total, then
    `iters` times: prototype rows divided by their sums and by K, sample columns divided by their sums
    and by N; finally multiplied by N. Each sample's row of Q sums to 1; each prototype's column sums to
    about N/K (exactly in the limit), so a square Q is doubly stochastic.
    """
    q = torch.exp((scores.float() - scores.float().max()) / epsilon).t()  # (K, N); max shift cancels below
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()  # (N, K)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE_soft(logits, q) = -mean_b sum_k q_bk log softmax(logits_b)_k on (B, K) tensors."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def swalip_loss(image_strong: torch.Tensor, text_strong: torch.Tensor, image_strong_all: torch.Tensor,
                text_strong_all: torch.Tensor, h_logit_scale: torch.Tensor, offset: int = 0,
                epsilon: float = 0.05, sk_iters: int = 3) -> torch.Tensor:
    """SwALIP (Fini et al., 2023): SwAV-style swapped prediction between strong views, where the other
    modality's gathered batch embeddings are the prototypes.

    For image view a and text view c: logits_i[a][c] = hi^a @ HT_all^c^T (B, N), logits_t[a][c] = ht^a @
    HI_all^c^T; targets T_i[a][c] = Sinkhorn(logits over the whole gathered batch) (rows offset..offset+B).
    Each (a, c) predicts the targets of every pair (a', c') with a' != a and c' != c:
        L = 1/A^2 sum_{a,c} mean_{a'!=a, c'!=c} 1/2 [CE_soft(s_h logits_i[a][c], T_i[a'][c'])
                                                    + CE_soft(s_h logits_t[a][c], T_t[a'][c'])]
    For A = 2 this is the reference's (1-a, 1-c) swap; any A >= 2 works (the reference hard-codes 2).
    Shapes: *_strong (B, A, D), *_strong_all (N, A, D), L2-normalised.
    """
    A, B = image_strong.shape[1], image_strong.shape[0]
    if A < 2:
        raise ValueError(f"SwALIP swaps predictions between strong views and needs at least 2, got {A}")
    logits_i = torch.einsum("bad,ncd->acbn", image_strong.float(), text_strong_all.float())  # (A, A, B, N)
    logits_t = torch.einsum("bad,ncd->acbn", text_strong.float(), image_strong_all.float())  # (A, A, B, N)
    with torch.no_grad():
        full_i = torch.einsum("bad,ncd->acbn", image_strong_all.float(), text_strong_all.float())  # (A, A, N, N)
        full_t = torch.einsum("bad,ncd->acbn", text_strong_all.float(), image_strong_all.float())
        targets_i = [[sinkhorn_knopp(full_i[a, c], epsilon, sk_iters)[offset:offset + B] for c in range(A)]
                     for a in range(A)]
        targets_t = [[sinkhorn_knopp(full_t[a, c], epsilon, sk_iters)[offset:offset + B] for c in range(A)]
                     for a in range(A)]
    total = 0.0
    for a in range(A):
        for c in range(A):
            swaps = [(a2, c2) for a2 in range(A) for c2 in range(A) if a2 != a and c2 != c]
            pair = sum(soft_cross_entropy(h_logit_scale * logits_i[a, c], targets_i[a2][c2])
                       + soft_cross_entropy(h_logit_scale * logits_t[a, c], targets_t[a2][c2])
                       for a2, c2 in swaps) / (2 * len(swaps))
            total = total + pair
    return total / (A * A)


def swalipv1_loss(p_image: torch.Tensor, p_text: torch.Tensor, p_image_all: torch.Tensor, p_text_all: torch.Tensor,
                  scale: torch.Tensor, offset: int = 0, epsilon: float = 0.05, sk_iters: int = 3) -> torch.Tensor:
    """SwALIP v1 (Fini et al., 2023, learned prototypes; SwAV, Caron et al., 2020) across modalities:
        codes_m = Sinkhorn(P_m_all)[rows of this rank],  L = 1/2 [CE_soft(s p_i, codes_t) + CE_soft(s p_t, codes_i)]
    Shapes: p_image/p_text (B, K) cosine scores against the K prototypes, p_*_all (N, K); s = 1/temperature.
    """
    B = p_image.shape[0]
    codes_i = sinkhorn_knopp(p_image_all.detach(), epsilon, sk_iters)[offset:offset + B]  # (B, K)
    codes_t = sinkhorn_knopp(p_text_all.detach(), epsilon, sk_iters)[offset:offset + B]
    return (soft_cross_entropy(scale * p_image, codes_t) + soft_cross_entropy(scale * p_text, codes_i)) / 2


def sigmoid_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP logits x_bc = t * i_b . x_c + bias in fp32: image (B, D), text (C, D) -> (B, C)."""
    return logit_scale * image.float() @ text.float().t() + logit_bias


def sigmoid_loss(image: torch.Tensor, text_all: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, offset: int = 0) -> dict[str, torch.Tensor]:
    """SigLIP pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training", ICCV).

        L = -1/B sum_{b} sum_{n} log sigmoid(z_bn * (t * i_b . x_n + bias)),  z_bn = +1 if n = offset + b else -1
    Local-vs-all layout: each rank scores its B images against all N texts, so the N ranks together cover
    every (image, text) pair once; the mean over ranks equals the loss of one process with N samples.
    Shapes: image (B, D), text_all (N, D), L2-normalised; logit_scale t and logit_bias scalars.
    """
    labels = torch.arange(image.shape[0], device=image.device) + offset  # (B,)
    logits = sigmoid_logits(image, text_all, logit_scale, logit_bias)  # (B, N)
    signs = -torch.ones_like(logits)
    signs[torch.arange(image.shape[0], device=image.device), labels] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
    return {"loss": loss, "siglip_loss": loss, "clip_acc": _accuracy(logits, labels),
            "logit_bias": logit_bias.detach()}


def sigmoid_block_loss(logits: torch.Tensor, positives: bool) -> torch.Tensor:
    """Summed SigLIP terms of one (B, C) block of `sigmoid_logits`, without a sign matrix.

    With -log sigmoid(-x) = softplus(x) and -log sigmoid(x) = softplus(x) - x:
        L_block = sum_{b,c} softplus(x_bc) - [positives] sum_b x_bb
    i.e. every pair a negative, except the diagonal of the block whose rows and columns are the same samples
    (positives=True, B = C). Returns a 0-d sum (fp32 for fp32 logits).
    """
    loss = F.softplus(logits).sum()
    return loss - torch.diagonal(logits).sum() if positives else loss


def _scored_block(image: torch.Tensor, text_block: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor, positives: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`sigmoid_block_loss` of image (B, D) vs text_block (C, D) and, without gradient, each row's largest negative
    logit (B,) for the accuracy."""
    logits = sigmoid_logits(image, text_block, logit_scale, logit_bias)  # (B, C)
    with torch.no_grad():
        negatives = logits.detach()
        if positives:  # a copy: the logits themselves are saved for the backward
            negatives = negatives.diagonal_scatter(torch.full_like(negatives.diagonal(), -torch.inf))
        best_negative = negatives.amax(dim=1)  # (B,)
    return sigmoid_block_loss(logits, positives), best_negative


def chunked_sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                         logit_bias: torch.Tensor, shift: Shift, num_blocks: int) -> dict[str, torch.Tensor]:
    """`sigmoid_loss` of B local images against all N = num_blocks * B texts, one (B, B) block at a time.

    The chunked exchange of Zhai et al., 2023 ("Sigmoid Loss for Language Image Pre-Training", ICCV, §3.3;
    big_vision's siglip ring): the own block holds the positives, then `shift` hands over the next rank's text
    block num_blocks - 1 times (each rank passes its current block around the ring), and
        L = 1/B sum_{k < num_blocks} L_block(image, text_k, positives = (k == 0)),
    the same value as `sigmoid_loss(image, gather(text), ..., offset=rank*B)` (up to summation order). Each block
    is recomputed in the backward pass (torch.utils.checkpoint), so the loss holds one (B, B) logit block at a
    time instead of (B, N): memory O(B^2 + N*D). `shift` must carry gradients back to the block's owner.
    Shapes: image/text (B, D) L2-normalised; logit_scale t and logit_bias scalars.
    Returns {"loss", "siglip_loss", "clip_acc" (image->text top-1 over all N texts, percent), "logit_bias"}.
    """
    block, total, best_negative = text, None, None
    for k in range(num_blocks):
        if k > 0:
            block = shift(block)  # (B, D): the text block of rank (rank - k) mod num_blocks
        part, row_max = checkpoint(_scored_block, image, block, logit_scale, logit_bias, k == 0, use_reentrant=False)
        total = part if total is None else total + part
        best_negative = row_max if best_negative is None else torch.maximum(best_negative, row_max)
    loss = total / image.shape[0]
    with torch.no_grad():
        positive = logit_scale * (image.float() * text.float()).sum(dim=1) + logit_bias  # (B,)
        acc = (positive > best_negative).float().mean() * 100
    return {"loss": loss, "siglip_loss": loss, "clip_acc": acc, "logit_bias": logit_bias.detach()}


class CL2LLoss(nn.Module):
    """`cl2l_loss` over gathered features. outputs: image_embed/text_embed (B,D), image_strong_embed/
    text_strong_embed (B,A,D), logit_scale, h_logit_scale."""

    def __init__(self, gather: Gather = identity_gather, rank: int = 0, label_smoothing: float = 0.0,
                 avg_or_sum: str = "avg") -> None:
        super().__init__()
        self.gather, self.rank = gather, rank
        self.label_smoothing, self.avg_or_sum = label_smoothing, avg_or_sum

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = outputs["image_embed"], outputs["text_embed"]
        image_s, text_s = outputs["image_strong_embed"], outputs["text_strong_embed"]
        return cl2l_loss(image, text, self.gather(image), self.gather(text), outputs["logit_scale"],
                         image_s, text_s, self.gather(image_s), self.gather(text_s), outputs["h_logit_scale"],
                         offset=self.rank * image.shape[0], label_smoothing=self.label_smoothing,
                         avg_or_sum=self.avg_or_sum)


class BARLIPLoss(CL2LLoss):
    """CL2L loss + `barlip_loss` on v_image, v_text (B,P), v_image_strong, v_text_strong (B,A,P)."""

    def __init__(self, gather: Gather = identity_gather, rank: int = 0, label_smoothing: float = 0.0,
                 avg_or_sum: str = "avg", lamb: float = 5e-3, scale: float = 0.025) -> None:
        super().__init__(gather, rank, label_smoothing, avg_or_sum)
        self.lamb, self.scale = lamb, scale

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(outputs)
        g = self.gather
        extra = barlip_loss(g(outputs["v_image"]), g(outputs["v_text"]), g(outputs["v_image_strong"]),
                            g(outputs["v_text_strong"]), self.lamb, self.scale)
        return {**out, "loss": out["loss"] + extra, "barlip_loss": extra}


class SIAMLIPLoss(CL2LLoss):
    """CL2L loss + `siamlip_loss`; targets are `v_*_momentum` (BYOLIP) when present, else the online `v_*`."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(outputs)
        target = "_momentum" if "v_image_momentum" in outputs else ""
        v = {k: outputs[f"v_{k}{target}"] for k in ("image", "text", "image_strong", "text_strong")}
        extra = siamlip_loss(outputs["p_image"], outputs["p_text"], v["image"], v["text"],
                             outputs["p_image_strong"], outputs["p_text_strong"], v["image_strong"], v["text_strong"])
        return {**out, "loss": out["loss"] + extra, "siamlip_loss": extra}


class SWALIPLoss(CL2LLoss):
    """CL2L loss + weight * `swalip_loss` on the strong MLP-projector embeddings."""

    def __init__(self, gather: Gather = identity_gather, rank: int = 0, label_smoothing: float = 0.0,
                 avg_or_sum: str = "avg", epsilon: float = 0.05, sk_iters: int = 3, weight: float = 0.2) -> None:
        super().__init__(gather, rank, label_smoothing, avg_or_sum)
        self.epsilon, self.sk_iters, self.weight = epsilon, sk_iters, weight

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(outputs)
        image_s, text_s = outputs["image_strong_embed"], outputs["text_strong_embed"]
        extra = swalip_loss(image_s, text_s, self.gather(image_s), self.gather(text_s), outputs["h_logit_scale"],
                            offset=self.rank * image_s.shape[0], epsilon=self.epsilon, sk_iters=self.sk_iters)
        return {**out, "loss": out["loss"] + self.weight * extra, "swalip_loss": extra}


class SWALIPV1Loss(CLIPLoss):
    """CLIP loss + weight * `swalipv1_loss` on p_image, p_text (B, K) with scale swalip_logit_scale."""

    def __init__(self, gather: Gather = identity_gather, rank: int = 0, label_smoothing: float = 0.0,
                 avg_or_sum: str = "avg", epsilon: float = 0.05, sk_iters: int = 3, weight: float = 0.2) -> None:
        super().__init__(gather, rank, label_smoothing, avg_or_sum)
        self.epsilon, self.sk_iters, self.weight = epsilon, sk_iters, weight

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(outputs)
        p_i, p_t = outputs["p_image"], outputs["p_text"]
        extra = swalipv1_loss(p_i, p_t, self.gather(p_i), self.gather(p_t), outputs["swalip_logit_scale"],
                              offset=self.rank * p_i.shape[0], epsilon=self.epsilon, sk_iters=self.sk_iters)
        return {**out, "loss": out["loss"] + self.weight * extra, "swalip_loss": extra,
                "swalip_logit_scale": outputs["swalip_logit_scale"].detach()}


class SIGLIPLoss(nn.Module):
    """`sigmoid_loss` with the texts gathered over ranks (with gradient). outputs: image_embed, text_embed
    (B, D), logit_scale, logit_bias."""

    def __init__(self, gather: Gather = identity_gather, rank: int = 0) -> None:
        super().__init__()
        self.gather, self.rank = gather, rank

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = outputs["image_embed"], outputs["text_embed"]
        return sigmoid_loss(image, self.gather(text), outputs["logit_scale"], outputs["logit_bias"],
                            offset=self.rank * image.shape[0])


class ChunkedSIGLIPLoss(nn.Module):
    """`chunked_sigmoid_loss`: the texts travel around the ring of `world_size` ranks through `shift`
    (utils.ring_shift_with_grad in training; with world_size 1 only the own block is scored). outputs: image_embed,
    text_embed (B, D), logit_scale, logit_bias. Same loss and gradients as `SIGLIPLoss`, O(B^2) logit memory."""

    def __init__(self, shift: Shift = identity_gather, world_size: int = 1) -> None:
        super().__init__()
        self.shift, self.world_size = shift, world_size

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return chunked_sigmoid_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"],
                                    outputs["logit_bias"], self.shift, self.world_size)


# --------------------------------------------------------------------------- the loss of a run
def build_criterion(spec: registry.ModelSpec, args: argparse.Namespace, env: utils.DistEnv) -> nn.Module:
    """The loss module of the model's objective (`spec.objective.loss`) with main.py's flags `args`, gathering
    over the ranks of `env` when there are several."""
    import utils

    gather = utils.all_gather_with_grad if env.distributed else identity_gather
    if spec.objective.loss == "clip":
        return CLIPLoss(gather, env.rank, args.label_smoothing, args.loss_avg_or_sum)
    common = dict(gather=gather, rank=env.rank, label_smoothing=args.label_smoothing, avg_or_sum=args.loss_avg_or_sum)
    if spec.objective.loss == "cl2l":
        return CL2LLoss(**common)
    if spec.objective.loss == "barlip":
        return BARLIPLoss(**common, lamb=args.barlip_lamb, scale=args.barlip_scale_loss)
    if spec.objective.loss == "siamlip":
        return SIAMLIPLoss(**common)
    if spec.objective.loss == "swalip":
        return SWALIPLoss(**common, epsilon=args.target_epsilon, sk_iters=args.sk_iters, weight=args.swalip_weight)
    if spec.objective.loss == "swalipv1":
        return SWALIPV1Loss(**common, epsilon=args.target_epsilon, sk_iters=args.sk_iters, weight=args.swalip_weight)
    if spec.objective.loss == "siglip" and args.siglip_chunked:
        return ChunkedSIGLIPLoss(utils.ring_shift_with_grad if env.distributed else identity_gather, env.world_size)
    if spec.objective.loss == "siglip":
        return SIGLIPLoss(gather, env.rank)
    raise ValueError(f"objective {spec.objective.name}: loss {spec.objective.loss!r} is not implemented")
