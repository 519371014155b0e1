"""losses.contrastive_loss / CLIPLoss against a naive float64 loop reference, plus invariants."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import loss_and_grads, run_gloo_ranks

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


# --------------------------------------------------------------------------- SigLIP, chunked (ring) form
def naive_sigmoid_rows(image, text_all, scale, bias, offset):
    """Float64 loop: 1/B sum_b sum_n -log sigmoid(z_bn (scale i_b.t_n + bias)), z = +1 only at n = offset + b."""
    total = 0.0
    for b in range(image.shape[0]):
        for n in range(text_all.shape[0]):
            z = 1.0 if n == offset + b else -1.0
            total += math.log1p(math.exp(-z * (float(scale) * float(image[b] @ text_all[n]) + float(bias))))
    return total / image.shape[0]


def fake_ring(blocks, rank):
    """The shift of rank `rank` in one process: the k-th call returns block (rank - k) mod W, as the ring does."""
    calls = iter(range(1, len(blocks)))
    return lambda _block: blocks[(rank - next(calls)) % len(blocks)]


def test_chunked_sigmoid_loss_equals_naive_reference_and_gathered_form_with_gradients():
    """4 simulated ranks of B = 3 in one process: each rank's ring loss equals the float64 loop over its rows
    against all 12 texts and the gathered `sigmoid_loss`; the ranks' mean has the gathered form's gradients for
    images, texts, scale and bias."""
    W, B = 4, 3
    image0, text0 = unit(W * B, 8, 11), unit(W * B, 8, 12)
    scale0, bias0 = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)

    def run(chunked):
        image, text, scale, bias = (t.clone().requires_grad_() for t in (image0, text0, scale0, bias0))
        outs = []
        for r in range(W):
            rows = slice(r * B, (r + 1) * B)
            if chunked:
                blocks = [text[i * B:(i + 1) * B] for i in range(W)]
                outs.append(losses.chunked_sigmoid_loss(image[rows], text[rows], scale, bias, fake_ring(blocks, r), W))
            else:
                outs.append(losses.sigmoid_loss(image[rows], text, scale, bias, offset=r * B))
        (sum(o["loss"] for o in outs) / W).backward()  # DDP's mean over ranks
        return outs, [t.grad for t in (image, text, scale, bias)]

    chunked, grads_chunked = run(chunked=True)
    gathered, grads_gathered = run(chunked=False)
    for r in range(W):
        expected = naive_sigmoid_rows(image0[r * B:(r + 1) * B], text0, scale0, bias0, r * B)
        assert chunked[r]["loss"].item() == pytest.approx(expected, rel=1e-6)  # the loss computes in fp32
        assert gathered[r]["loss"].item() == pytest.approx(expected, rel=1e-6)
        assert float(chunked[r]["clip_acc"]) == float(gathered[r]["clip_acc"])
        assert set(chunked[r]) == set(gathered[r])
    for got, want in zip(grads_chunked, grads_gathered, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_sigmoid_loss_counts_every_block_in_the_accuracy():
    """The top-1 image->text accuracy looks at all N texts: a distractor in another rank's block is found."""
    text = torch.eye(4, dtype=torch.float64)
    image = text.clone()
    blocks = [text[:2], text[2:]]
    out = losses.chunked_sigmoid_loss(image[:2], text[:2], torch.tensor(10.0), torch.tensor(0.0),
                                      fake_ring(blocks, 0), 2)
    assert float(out["clip_acc"]) == 100.0
    image = image.clone()
    image[0] = text[3]  # image 0 now matches a text of the other block best
    out = losses.chunked_sigmoid_loss(image[:2], text[:2], torch.tensor(10.0), torch.tensor(0.0),
                                      fake_ring(blocks, 0), 2)
    assert float(out["clip_acc"]) == 50.0


def _siglip_forms_at_rank(rank, world):
    """Rank `rank`'s loss and input gradients of the gathered and the ring SigLIP losses on one fixed batch."""
    import utils

    outputs = siglip_outputs(4 * world)
    gathered = losses.SIGLIPLoss(utils.all_gather_with_grad, rank)
    ring = losses.ChunkedSIGLIPLoss(utils.ring_shift_with_grad, world)
    return {"gathered": loss_and_grads(gathered, outputs, rank, world),
            "chunked": loss_and_grads(ring, outputs, rank, world)}


def siglip_outputs(n, d=6):
    g = torch.Generator().manual_seed(0)
    return {"image_embed": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "text_embed": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-3.0)}


@pytest.mark.slow
def test_chunked_siglip_at_four_gloo_ranks_equals_the_gathered_form_and_one_process(tmp_path):
    """4 real gloo ranks: the ring (utils.ring_shift_with_grad, point-to-point) gives every rank the loss and the
    gradients (images, texts, scale, bias) of the gathered form (all_gather_with_grad), and together those of one
    process holding the whole batch; the texts' gradients travelled back around the ring to their owners."""
    world = 4
    ranks = run_gloo_ranks(_siglip_forms_at_rank, world, tmp_path)
    loss, grads = loss_and_grads(losses.SIGLIPLoss(), siglip_outputs(4 * world))
    for r in range(world):
        assert ranks[r]["chunked"][0] == pytest.approx(ranks[r]["gathered"][0], rel=1e-6)
        for key, grad in ranks[r]["gathered"][1].items():
            torch.testing.assert_close(ranks[r]["chunked"][1][key], grad, rtol=1e-5, atol=1e-7)
    assert sum(ranks[r]["chunked"][0] for r in range(world)) / world == pytest.approx(loss, rel=1e-6)
    for key, grad in grads.items():
        got = [ranks[r]["chunked"][1][key] for r in range(world)]
        got = torch.cat(got) if grad.ndim else sum(got)  # rows per rank; scalars: DDP sums the per-rank means
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-7)
