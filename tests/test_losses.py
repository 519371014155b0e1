"""losses.contrastive_loss / CLIPLoss against a naive float64 loop reference, plus invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses


def naive_clip_loss(image, text, scale, eps=0.0, avg_or_sum="avg"):
    """Row-by-row float64 reference: per-row log-softmax, smoothed CE = (1-eps)*CE + eps*mean_j(-log p_j)."""
    image, text, scale = image.double(), text.double(), float(scale)
    n = image.shape[0]

    def direction(a, b):
        total = 0.0
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            m = max(logits)
            log_z = m + math.log(sum(math.exp(x - m) for x in logits))
            log_p = [x - log_z for x in logits]
            total += (1 - eps) * (-log_p[i]) + eps * sum(-lp for lp in log_p) / n
        return total / n

    loss_i, loss_t = direction(image, text), direction(text, image)
    clip = (loss_i + loss_t) / 2
    return clip * (2 if avg_or_sum == "sum" else 1), clip


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("avg_or_sum", ["avg", "sum"])
def test_matches_naive_reference(eps, avg_or_sum):
    img, txt = unit(12, 16, 0), unit(12, 16, 1)
    scale = torch.tensor(1 / 0.07)
    out = losses.contrastive_loss(img, txt, img, txt, scale, label_smoothing=eps, avg_or_sum=avg_or_sum)
    ref_loss, ref_clip = naive_clip_loss(img, txt, scale, eps, avg_or_sum)
    assert out["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert out["clip_loss"].item() == pytest.approx(ref_clip, rel=1e-5)
    assert set(out) == {"loss", "clip_loss", "clip_acc"}


def test_sum_is_twice_avg_and_bad_mode_raises():
    img, txt = unit(8, 8, 2), unit(8, 8, 3)
    s = torch.tensor(10.0)
    avg = losses.contrastive_loss(img, txt, img, txt, s, avg_or_sum="avg")["loss"]
    tot = losses.contrastive_loss(img, txt, img, txt, s, avg_or_sum="sum")["loss"]
    assert tot.item() == pytest.approx(2 * avg.item(), rel=1e-6)
    with pytest.raises(ValueError, match="avg_or_sum"):
        losses.contrastive_loss(img, txt, img, txt, s, avg_or_sum="mean")


def test_clip_acc_counts_image_to_text_top1():
    txt = unit(6, 8, 4)
    img = txt.clone()
    img[[0, 1]] = txt[[1, 0]]  # rows 0 and 1 point at each other's caption
    out = losses.contrastive_loss(img, txt, img, txt, torch.tensor(50.0))
    assert out["clip_acc"].item() == pytest.approx(100 * 4 / 6)


def test_local_loss_layout_halves_average_to_full_loss_and_gradient():
    """Two 'ranks' of B rows, each scoring its rows against all 2B columns with an offset, average to the
    full-batch loss and its gradient (what DDP's gradient mean sees)."""
    B = 5
    img0, txt0 = unit(2 * B, 16, 5).float(), unit(2 * B, 16, 6).float()
    scale0 = torch.tensor(1 / 0.07)

    img, txt, scale = (t.clone().requires_grad_() for t in (img0, txt0, scale0))
    full = losses.contrastive_loss(img, txt, img, txt, scale, label_smoothing=0.1)["loss"]
    full.backward()

    img2, txt2, scale2 = (t.clone().requires_grad_() for t in (img0, txt0, scale0))
    parts = [losses.contrastive_loss(img2[r * B:(r + 1) * B], txt2[r * B:(r + 1) * B], img2, txt2, scale2,
                                     offset=r * B, label_smoothing=0.1)["loss"] for r in range(2)]
    split = (parts[0] + parts[1]) / 2
    split.backward()
    assert split.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in ((img, img2), (txt, txt2), (scale, scale2)):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_clip_loss_module_uses_gather_and_rank_offset():
    """CLIPLoss(rank=1) with a gather that prepends another rank's rows equals the second half of the layout."""
    B = 4
    img, txt = unit(2 * B, 8, 7).float(), unit(2 * B, 8, 8).float()
    other_rank = iter([img[:B], txt[:B]])  # CLIPLoss gathers the image features, then the text features

    def gather(t):  # rank 1 holds rows B..2B; the other rank holds rows 0..B
        return torch.cat([next(other_rank), t])

    crit = losses.CLIPLoss(gather, rank=1, label_smoothing=0.0)
    out = crit({"image_embed": img[B:], "text_embed": txt[B:], "logit_scale": torch.tensor(20.0)})
    ref = losses.contrastive_loss(img[B:], txt[B:], img, txt, torch.tensor(20.0), offset=B)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_aligned_embeddings_with_big_scale_give_near_zero_loss():
    emb = torch.eye(8, dtype=torch.float64)  # orthonormal, so every negative has similarity 0
    out = losses.contrastive_loss(emb, emb, emb, emb, torch.tensor(100.0))
    assert out["loss"].item() < 1e-10
    assert out["clip_acc"].item() == 100.0


def test_permuting_pairs_leaves_loss_unchanged():
    img, txt = unit(10, 12, 9), unit(10, 12, 10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    s = torch.tensor(1 / 0.07)
    a = losses.contrastive_loss(img, txt, img, txt, s, label_smoothing=0.2)["loss"]
    b = losses.contrastive_loss(img[perm], txt[perm], img[perm], txt[perm], s, label_smoothing=0.2)["loss"]
    assert b.item() == pytest.approx(a.item(), rel=1e-6)  # the loss computes in fp32


def test_uniform_logits_give_log_n():
    """All similarities equal -> every row is uniform -> loss = ln N, for any smoothing."""
    emb = F.normalize(torch.ones(7, 4, dtype=torch.float64), dim=-1)
    out = losses.contrastive_loss(emb, emb, emb, emb, torch.tensor(30.0), label_smoothing=0.3)
    assert out["loss"].item() == pytest.approx(math.log(7), rel=1e-6)  # the loss computes in fp32
