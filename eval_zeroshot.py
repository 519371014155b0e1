"""Zero-shot classification: prompt-ensembled class embeddings and top-k accuracy.

The functions here serve both `main.py`'s per-epoch validation and offline evaluation.
Class embedding (Radford et al., 2021, §3.1.4): embed every template filled with the class name,
L2-normalise each, average them, L2-normalise the average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: list[str], templates: list[str],
                        device: torch.device, head: str = "z") -> torch.Tensor:
    """-> (C, D) unit-norm class embeddings of embedding head `head`, one row per class name."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)  # (P, L)
        embeds = F.normalize(model.encode_text(tokens, head=head).float(), dim=-1)  # (P, D)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, D)


@torch.no_grad()
def encode_images(model, loader: DataLoader, device: torch.device,
                  head: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """-> ((N, D) unit-norm image embeddings, (N,) labels) over a loader of (image, label) batches."""
    feats, labels = [], []
    for images, target in loader:
        feats.append(F.normalize(model.encode_image(images.to(device), head=head).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits, for each k (capped at C)."""
    top = logits.topk(max(ks), dim=-1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {f"acc{k}": float(hits[:, :min(k, logits.shape[1])].any(dim=1).float().mean() * 100) for k in ks}


@torch.no_grad()
def zeroshot_accuracy(model, tokenizer, classnames: list[str], templates: list[str], loader: DataLoader,
                      device: torch.device) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy (percent) for each embedding head of `model`.

    Keys are acc1_<head>/acc5_<head> ("z": the CLIP projector). A model with the heads z and h (CL2L)
    also gets the blends zh_<w>: similarities w*sim_z + (1-w)*sim_h for w in 0.1..0.9.
    """
    sims, labels = {}, None
    for head in getattr(model, "embedding_heads", ("z",)):
        classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device, head)  # (C, D)
        feats, labels = encode_images(model, loader, device, head)  # (N, D), (N,)
        sims[head] = feats @ classifier.t()  # (N, C)
    if {"z", "h"} <= sims.keys():
        for w in [round(0.1 * i, 1) for i in range(1, 10)]:
            sims[f"zh_{w}"] = w * sims["z"] + (1 - w) * sims["h"]
    metrics = {}
    for name, sim in sims.items():
        metrics.update({f"{k}_{name}": v for k, v in topk_accuracy(sim, labels).items()})
    return metrics
