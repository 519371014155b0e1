"""Image-text retrieval metrics (R@K with several ground truths per query, as the MUGE scorer counts).

A query is a hit at K when any of its ground-truth items is among its K most similar gallery items;
R@K is the percent of queries that hit, and the mean recall (MR) averages R@1/5/10 of both directions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """sim (Q, G) similarities, positives (Q, G) bool ground truth -> {"R@k": percent} for each k.

    Ties are broken by gallery order (a stable sort), like Chinese-CLIP's top-k scripts.
    """
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices  # (Q, G)
    hits = torch.gather(positives, 1, order)  # (Q, G) ground truth in ranked order
    return {f"R@{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks}


@torch.no_grad()
def caption_retrieval(model, tokenizer, images: torch.Tensor, captions: list[list[str]],
                      device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Image<->text recall on a test set where image i has the caption strings captions[i].

    The text gallery holds each distinct caption once; an image's ground truth is all of its
    captions, a caption's ground truth all images it describes. images: (N, 3, H, W).
    """
    texts = sorted({c for caps in captions for c in caps})
    text_index = {t: i for i, t in enumerate(texts)}
    positives = torch.zeros(len(captions), len(texts), dtype=torch.bool)  # (N, T)
    for i, caps in enumerate(captions):
        positives[i, [text_index[c] for c in caps]] = True
    img = torch.cat([F.normalize(model.encode_image(images[i:i + batch_size].to(device)).float(), dim=-1).cpu()
                     for i in range(0, len(images), batch_size)])  # (N, D)
    txt = torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(),
                                 dim=-1).cpu() for i in range(0, len(texts), batch_size)])  # (T, D)
    sim = img @ txt.t()  # (N, T)
    i2t = {f"image_to_text_{k}": v for k, v in recall_at_k(sim, positives).items()}
    t2i = {f"text_to_image_{k}": v for k, v in recall_at_k(sim.t(), positives.t()).items()}
    return {**i2t, **t2i, "mean_recall": (sum(i2t.values()) + sum(t2i.values())) / 6}
