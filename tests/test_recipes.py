"""CLIP🚀 (CL2L), SiamLIP/BYOLIP, BarLIP, SwALIP(V1), SigLIP: losses vs naive float64 references and
invariants, model hooks (EMA, frozen prototypes, clamps), exact accumulation, registry and flags, and
two optimizer steps of every registered objective."""
import copy
import dataclasses
import math
import shlex

import pytest
import torch
import torch.nn.functional as F
from conftest import loss_and_grads, run_gloo_ranks
from torch.utils.data import DataLoader

import datasets
import engine
import losses
import main
import models
import readers
import registry
import utils


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --------------------------------------------------------------------------- naive references (loops, float64)
def naive_ce(logits_row, target, eps=0.0):
    """Smoothed CE of one row, closed form: (1-eps) * (-log p_y) + eps * mean_j(-log p_j)."""
    m = max(logits_row)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits_row))
    log_p = [x - log_z for x in logits_row]
    return (1 - eps) * (-log_p[target]) + eps * sum(-lp for lp in log_p) / len(log_p)


def naive_direction(a_rows, b_all, scale, eps=0.0, offset=0):
    n = len(b_all)
    return sum(naive_ce([scale * float(a_rows[i] @ b_all[j]) for j in range(n)], offset + i, eps)
               for i in range(len(a_rows))) / len(a_rows)


def naive_cl2l(i, t, i_s, t_s, s, s_h, eps, avg_or_sum="avg"):
    A = i_s.shape[1]
    lg_i, lg_t = naive_direction(i, t, s), naive_direction(t, i, s)
    if A == 0:
        l_i, l_t = lg_i, lg_t
    else:
        ll_i = sum(naive_direction(i_s[:, a], t_s[:, c], s_h, eps) for a in range(A) for c in range(A)) / A ** 2
        ll_t = sum(naive_direction(t_s[:, a], i_s[:, c], s_h, eps) for a in range(A) for c in range(A)) / A ** 2
        l_i, l_t = (lg_i + A * ll_i) / (1 + A), (lg_t + A * ll_t) / (1 + A)
    clip = (l_i + l_t) / 2
    return clip * (2 if avg_or_sum == "sum" else 1)


def naive_barlow(z1, z2, lamb, scale):
    n, p = z1.shape
    total = 0.0
    for a in range(p):
        for b in range(p):
            c = sum(float(z1[k, a] * z2[k, b]) for k in range(n)) / n
            total += (1 - c) ** 2 if a == b else lamb * c ** 2
    return scale * total


def naive_sinkhorn(scores, eps, iters):
    n, k = scores.shape
    q = [[math.exp(float(scores[b, j]) / eps) for b in range(n)] for j in range(k)]  # (K, N)
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        col = [sum(q[j][b] for j in range(k)) for b in range(n)]
        q = [[q[j][b] / col[b] / n for b in range(n)] for j in range(k)]
    return torch.tensor([[q[j][b] * n for j in range(k)] for b in range(n)], dtype=torch.float64)


def naive_soft_ce(logits, targets):
    total = 0.0
    for b in range(logits.shape[0]):
        row = [float(x) for x in logits[b]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(x - m) for x in row))
        total += -sum(float(targets[b, j]) * (row[j] - log_z) for j in range(len(row)))
    return total / logits.shape[0]


# --------------------------------------------------------------------------- CL2L loss
@pytest.mark.parametrize("A,eps,avg_or_sum", [(1, 0.0, "avg"), (2, 0.1, "avg"), (3, 0.2, "sum")])
def test_cl2l_loss_matches_naive_reference(A, eps, avg_or_sum):
    B, D = 5, 8
    i, t, i_s, t_s = unit(B, D, seed=0), unit(B, D, seed=1), unit(B, A, D, seed=2), unit(B, A, D, seed=3)
    s, s_h = torch.tensor(1 / 0.07, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)
    out = losses.cl2l_loss(i, t, i, t, s, i_s, t_s, i_s, t_s, s_h, label_smoothing=eps, avg_or_sum=avg_or_sum)
    assert float(out["loss"]) == pytest.approx(naive_cl2l(i, t, i_s, t_s, float(s), float(s_h), eps, avg_or_sum),
                                               rel=1e-5)
    # the global term is never smoothed; the strong terms are
    assert float(out["clip_loss_image_global"]) == pytest.approx(naive_direction(i, t, float(s)), rel=1e-5)


def test_cl2l_with_zero_augs_is_exactly_clip():
    B, D = 6, 8
    i, t = unit(B, D, seed=4), unit(B, D, seed=5)
    empty = torch.zeros(B, 0, D, dtype=torch.float64)
    s = torch.tensor(14.0, dtype=torch.float64)
    for avg_or_sum in ("avg", "sum"):
        cl2l = losses.cl2l_loss(i, t, i, t, s, empty, empty, empty, empty, s, label_smoothing=0.3,
                                avg_or_sum=avg_or_sum)
        clip = losses.contrastive_loss(i, t, i, t, s, avg_or_sum=avg_or_sum)
        assert torch.equal(cl2l["loss"], clip["loss"]) and torch.equal(cl2l["clip_acc"], clip["clip_acc"])


def test_cl2l_local_vs_all_layout_averages_to_the_full_batch():
    """Two 'ranks' scoring their rows against all columns average to the one-process loss."""
    B, A, D = 6, 2, 8
    i, t, i_s, t_s = unit(B, D, seed=6), unit(B, D, seed=7), unit(B, A, D, seed=8), unit(B, A, D, seed=9)
    s = torch.tensor(10.0, dtype=torch.float64)
    full = losses.cl2l_loss(i, t, i, t, s, i_s, t_s, i_s, t_s, s, label_smoothing=0.1)["loss"]
    parts = [losses.cl2l_loss(i[r:r + 3], t[r:r + 3], i, t, s, i_s[r:r + 3], t_s[r:r + 3], i_s, t_s, s, offset=r,
                              label_smoothing=0.1)["loss"] for r in (0, 3)]
    assert float(sum(parts) / 2) == pytest.approx(float(full), rel=1e-6)


# --------------------------------------------------------------------------- BarLIP, SiamLIP
def test_barlip_loss_matches_naive_reference():
    B, A, P = 6, 2, 5
    g = torch.Generator().manual_seed(0)
    v_i, v_t = torch.randn(B, P, generator=g, dtype=torch.float64), torch.randn(B, P, generator=g, dtype=torch.float64)
    v_is, v_ts = (torch.randn(B, A, P, generator=g, dtype=torch.float64) for _ in range(2))
    expected = (naive_barlow(v_i, v_t, 5e-3, 0.025)
                + sum(naive_barlow(v_is[:, a], v_ts[:, c], 5e-3, 0.025) for a in range(A) for c in range(A))) / 5
    assert float(losses.barlip_loss(v_i, v_t, v_is, v_ts, 5e-3, 0.025)) == pytest.approx(expected, rel=1e-5)


def test_siamlip_loss_matches_naive_reference_and_stops_target_gradients():
    B, A, P = 4, 2, 6
    g = torch.Generator().manual_seed(1)
    p_i, p_t, v_i, v_t = (torch.randn(B, P, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    p_is, p_ts, v_is, v_ts = (torch.randn(B, A, P, generator=g, dtype=torch.float64, requires_grad=True)
                              for _ in range(4))

    def d(p, v):
        p, v = p.detach(), v.detach()
        return 2 - 2 * sum(float(p[b] @ v[b]) / (float(p[b].norm()) * float(v[b].norm())) for b in range(B)) / B

    expected = d(p_i, v_t) + d(p_t, v_i)
    expected += sum(d(p_is[:, a], v_ts[:, c]) + d(p_ts[:, a], v_is[:, c]) for a in range(A) for c in range(A))
    loss = losses.siamlip_loss(p_i, p_t, v_i, v_t, p_is, p_ts, v_is, v_ts)
    assert loss.item() == pytest.approx(expected / (2 + 2 * A * A), rel=1e-5)
    loss.backward()
    assert p_i.grad.abs().sum() > 0 and v_i.grad is None and v_is.grad is None


# --------------------------------------------------------------------------- Sinkhorn, SwALIP
def test_sinkhorn_matches_naive_and_is_doubly_stochastic():
    scores = unit(6, 4, seed=2) @ unit(5, 4, seed=3).t()  # (N=6 samples, K=5 prototypes)
    q = losses.sinkhorn_knopp(scores, epsilon=0.05, iters=3)
    assert torch.allclose(q.double(), naive_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-5)  # each sample: a distribution
    square = losses.sinkhorn_knopp(unit(8, 4, seed=4) @ unit(8, 4, seed=5).t(), epsilon=0.5, iters=200)
    assert torch.allclose(square.sum(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(square.sum(dim=0), torch.ones(8), atol=1e-4)  # equipartition: doubly stochastic


def test_swalip_two_views_is_the_reference_swap_and_any_number_of_views_works():
    B, D = 5, 6
    i_s, t_s = unit(B, 2, D, seed=10), unit(B, 2, D, seed=11)
    s_h = torch.tensor(10.0, dtype=torch.float64)
    expected = 0.0
    for a in range(2):
        for c in range(2):
            target_i = naive_sinkhorn(i_s[:, 1 - a] @ t_s[:, 1 - c].t(), 0.05, 3)
            target_t = naive_sinkhorn(t_s[:, 1 - a] @ i_s[:, 1 - c].t(), 0.05, 3)
            expected += 0.5 * (naive_soft_ce(s_h * i_s[:, a] @ t_s[:, c].t(), target_i)
                               + naive_soft_ce(s_h * t_s[:, a] @ i_s[:, c].t(), target_t))
    got = losses.swalip_loss(i_s, t_s, i_s, t_s, s_h, epsilon=0.05, sk_iters=3)
    assert float(got) == pytest.approx(expected / 4, rel=1e-4)
    three = losses.swalip_loss(unit(B, 3, D, seed=12), unit(B, 3, D, seed=13), unit(B, 3, D, seed=12),
                               unit(B, 3, D, seed=13), s_h)
    assert torch.isfinite(three)
    with pytest.raises(ValueError, match="at least 2"):
        losses.swalip_loss(i_s[:, :1], t_s[:, :1], i_s[:, :1], t_s[:, :1], s_h)


def test_swalipv1_loss_matches_naive_reference():
    B, K = 6, 4
    p_i, p_t = unit(B, 5, seed=14) @ unit(K, 5, seed=15).t(), unit(B, 5, seed=16) @ unit(K, 5, seed=15).t()
    s = torch.tensor(10.0, dtype=torch.float64)
    expected = 0.5 * (naive_soft_ce(s * p_i, naive_sinkhorn(p_t, 0.05, 3))
                      + naive_soft_ce(s * p_t, naive_sinkhorn(p_i, 0.05, 3)))
    assert float(losses.swalipv1_loss(p_i, p_t, p_i, p_t, s)) == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- SigLIP
def test_sigmoid_loss_is_the_per_pair_sigmoid_sum_and_splits_over_ranks():
    B, D = 6, 8
    i, t = unit(B, D, seed=17), unit(B, D, seed=18)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    expected = 0.0
    for r in range(B):
        for c in range(B):
            z = 1.0 if r == c else -1.0
            expected += -math.log(1 / (1 + math.exp(-z * (float(s) * float(i[r] @ t[c]) + float(b)))))
    full = losses.sigmoid_loss(i, t, s, b)["loss"]
    assert float(full) == pytest.approx(expected / B, rel=1e-6)
    parts = [losses.sigmoid_loss(i[r:r + 3], t, s, b, offset=r)["loss"] for r in (0, 3)]
    assert float(sum(parts) / 2) == pytest.approx(float(full), rel=1e-6)


# --------------------------------------------------------------------------- models: hooks and clamps
TINY_RECIPE = dict(cl2l_hidden_dim=32, barlip_hidden_dim=32, barlip_proj_dim=16, siamlip_hidden_dim=32,
                   siamlip_proj_dim=8, swalip_hidden_dim=32, swalip_proj_dim=8, swalip_num_proto=10)


def tiny_model(name, **recipe):
    opts = models.RecipeOptions(**{**TINY_RECIPE, **recipe})
    return models.build_model(models.parse_model_name(name), image_size=32, text_layers=1, text_width=64,
                              text_heads=2, recipe=opts)


def test_build_model_constructs_what_the_recipe_says():
    """Projections and the strong-text regularisers are constructor arguments (no patching after the build): the
    classes hold what the recipe and the backbone say, and `model.opts` is the recipe."""
    model = tiny_model("CL2L_VITT16_CL2L", text_dropout_prob=0.1, text_drop_path_prob=0.2, clip_proj_type="mlp",
                       clip_hidden_dim=24)
    assert all(b.strong_dropout.p == 0.1 and b.strong_drop_path.drop_prob == 0.2 for b in model.text.resblocks)
    assert isinstance(model.image_projection, torch.nn.Sequential) and model.image_projection[0].out_features == 24
    assert model.opts.clip_proj_type == "mlp" and model.opts.text_dropout_prob == 0.1
    plain = tiny_model("CL2L_VITT16_CL2L")
    assert all(isinstance(b.strong_drop_path, torch.nn.Identity) and b.strong_dropout.p == 0 for b in
               plain.text.resblocks)
    with torch.device("meta"):  # OpenAI RN50's attention pool is its own image projection
        rn50 = models.build_model(models.parse_model_name("CLIP_RN50_SIGLIP"), recipe={"clip_proj_type": "mlp"})
    assert isinstance(rn50.image_projection, torch.nn.Identity) and isinstance(rn50.text_projection,
                                                                                torch.nn.Sequential)


def test_byolip_target_moves_by_the_ema_rule():
    model = tiny_model("CL2L_VITT16_BYOLIP", separate_proj=True, momentum_tau=0.9)
    assert model.target is not None and not any(p.requires_grad for p in model.target.parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = [(t.clone(), o.clone()) for t, o in model.target.pairs(model)]
    model.after_optimizer_step(1, 10)
    for (t0, o0), (t1, _) in zip(before, model.target.pairs(model)):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o0, atol=1e-6)
    assert models.momentum_tau(0.99, "cosine", 0, 100) == pytest.approx(0.99)
    assert models.momentum_tau(0.99, "cosine", 100, 100) == pytest.approx(1.0)
    assert models.momentum_tau(0.99, "constant", 50, 100) == 0.99
    # SIAMLIP --momentum is the same recipe (clip-rocket's command line)
    assert tiny_model("CL2L_VITT16_SIAMLIP", momentum=True).target is not None
    assert tiny_model("CL2L_VITT16_SIAMLIP").target is None


def test_byolip_target_follows_pretrained_weights(tmp_path):
    """--pretrained replaces the online towers after the target was copied: the target is re-copied."""
    import weights

    source = tiny_model("CL2L_VITT16_BYOLIP", separate_proj=True)
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("target.")}, tmp_path / "w.pt")
    model = tiny_model("CL2L_VITT16_BYOLIP", separate_proj=True)
    weights.load_weights(model, str(tmp_path / "w.pt"))
    assert not all(torch.equal(t, o) for t, o in model.target.pairs(model))  # stale random target
    model.after_weights_loaded()
    assert all(torch.equal(t, o) for t, o in model.target.pairs(model))


def test_swalipv1_prototypes_frozen_for_the_first_iterations():
    model = tiny_model("CLIP_VITT16_SWALIPV1", swalip_freeze_proto_iters=2)
    tokens = torch.randint(1, 100, (4, 77))
    tokens[:, 6] = 49407
    out = model(torch.randn(4, 3, 32, 32), tokens)
    losses.SWALIPV1Loss()(out)["loss"].backward()
    model.before_optimizer_step(1)
    assert model.prototypes.weight.grad is None and model.image_projection.weight.grad is not None
    out = model(torch.randn(4, 3, 32, 32), tokens)
    losses.SWALIPV1Loss()(out)["loss"].backward()
    model.before_optimizer_step(2)
    assert model.prototypes.weight.grad is not None


def test_clamps_only_existing_temperatures():
    shared = tiny_model("CL2L_VITT16_CL2L")  # no --separate-proj: no l2l_logit_scale (the reference crashes here)
    assert not hasattr(shared, "l2l_logit_scale")
    shared.clamp_logit_scale()
    separate = tiny_model("CL2L_VITT16_CL2L", separate_proj=True)
    with torch.no_grad():
        separate.l2l_logit_scale.fill_(9.0)
    separate.clamp_logit_scale()
    assert float(separate.l2l_logit_scale) == pytest.approx(math.log(100))
    assert separate.embedding_heads == ("z", "h")


def test_cl2l_exact_accumulation_equals_the_big_batch():
    """update-freq 2 x B 4 gives the gradient of one B 8 step (linear projectors: no batch statistics)."""
    model = tiny_model("CL2L_VITT16_CL2L", separate_proj=True, cl2l_img_proj_type="linear",
                       cl2l_txt_proj_type="linear")
    criterion = losses.CL2LLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    images, strong = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 2, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (8, 3, 77), generator=g)
    tokens[..., 9] = 49407
    args = main.parse_args(["--model", "CL2L_VITT16_CL2L"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        engine.forward_backward(model, criterion, micro, engine.StepConfig.from_args(args, torch.device("cpu")),
                                scaler)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big = grads([(images, tokens, strong)])
    small = grads([(images[:4], tokens[:4], strong[:4]), (images[4:], tokens[4:], strong[4:])])
    assert big.keys() == small.keys() and "l2l_logit_scale" in big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name


def test_exact_accumulation_moves_batchnorm_statistics_once_per_micro_batch():
    """SIAMLIP's projectors have BatchNorm: at update-freq 4 each micro-batch moves the running statistics
    once, in the order the step runs them (the last one first, kept from the caching pass), never also in the
    caching pass itself."""
    model = tiny_model("CL2L_VITT16_SIAMLIP", separate_proj=True)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    images, strong = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 2, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (8, 3, 77), generator=g)
    tokens[..., 9] = 49407
    micro = [(images[i:i + 2], tokens[i:i + 2], strong[i:i + 2]) for i in range(0, 8, 2)]
    step = engine.StepConfig.from_args(main.parse_args(["--model", "CL2L_VITT16_SIAMLIP"]), torch.device("cpu"))
    engine.forward_backward(model, losses.SIAMLIPLoss(), micro, step, torch.amp.GradScaler("cpu", enabled=False))
    with torch.no_grad():
        for j in (3, 0, 1, 2):
            reference(*micro[j])
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    expected = dict(reference.named_modules())
    assert norms and int(norms[0][1].num_batches_tracked) == 4  # the l2l projector: once per micro-batch
    for name, m in norms:  # (the siam heads run twice per forward: weak and strong views)
        assert int(m.num_batches_tracked) == int(expected[name].num_batches_tracked), name
        torch.testing.assert_close(m.running_mean, expected[name].running_mean, msg=name)
        torch.testing.assert_close(m.running_var, expected[name].running_var, msg=name)


# --------------------------------------------------------------------------- registry, flags, two steps each
def test_a_flag_the_model_would_ignore_fails_at_parse_time(capsys):
    """An objective's own flag on a model that never reads it is an error, never a silent baseline run."""
    refused = {("CLIP_VITT16_CLIP", "--barlip-lamb", "0.01"): "--barlip-lamb: used only by BARLIP",
               ("CL2L_VITT16_CL2L", "--swalip-weight", "0.5"): "--swalip-weight: used only by SWALIP and SWALIPV1",
               ("CL2L_VITT16_SWALIP", "--swalip-num-proto", "10"): "used only by SWALIPV1",
               ("CL2L_VITT16_SIAMLIP", "--momentum-tau", "0.9"): "used only by BYOLIP and SIAMLIP --momentum",
               ("CLIP_VITT16_CLIP", "--blur-prob", "0.1"): "used only by the multi-view CL2L-base models",
               ("CLIP_VITT16_CLIP", "--siglip-chunked", None): "--siglip-chunked: used only by SIGLIP"}
    for (model, flag, value), message in refused.items():
        with pytest.raises(SystemExit):
            main.parse_args(["--model", model, flag] + ([value] if value else []))
        err = capsys.readouterr().err
        assert message in err and f"{model} would ignore it" in err, err
    for argv in (["--model", "CL2L_VITT16_BARLIP", "--barlip-lamb", "0.01"],  # where they apply they parse
                 ["--model", "CL2L_VITT16_SWALIP", "--swalip-weight", "0.5"],
                 ["--model", "CLIP_VITT16_SWALIPV1", "--swalip-num-proto", "10"],
                 ["--model", "CL2L_VITT16_SIAMLIP", "--momentum", "--momentum-tau", "0.9"],
                 ["--model", "CL2L_VITT16_CL2L", "--blur-prob", "0.1"],
                 ["--model", "CNCLIP_VITT16_SIGLIP", "--siglip-chunked"],
                 ["--model", "CLIP_VITT16_CLIP", "--blur-prob", "0.5"]):  # the default value is not a change
        main.parse_args(argv)


def test_registry_flag_groups_are_the_parsers_and_recipe_fields_are_flags():
    """Who reads which flags is registry data naming parser groups: every declared group exists, every family
    group of the parser is declared, and RecipeOptions is filled from the flags by field name (same defaults)."""
    groups = registry.parser_flag_groups(main.get_args_parser())
    family = {g for g in groups if g.startswith("objective:")} | {"augment:image"}
    assert registry.family_flag_groups() == family and family <= set(groups)
    assert [g for g, dests in groups.items() if dests][:4] == ["data", "model", "objective", "objective:cl2l"]
    fields = {f.name for f in dataclasses.fields(registry.RecipeOptions)}
    assert fields <= {d for dests in groups.values() for d in dests}
    assert registry.recipe_from_flags(vars(main.parse_args([]))) == registry.RecipeOptions()
    args = main.parse_args(["--model", "CL2L_VITT16_SIAMLIP", "--momentum", "--momentum-tau", "0.9",
                            "--siamlip-proj-dim", "7", "--clip-proj-type", "mlp"])
    recipe = registry.recipe_from_flags(vars(args))
    assert (recipe.momentum, recipe.momentum_tau, recipe.siamlip_proj_dim, recipe.clip_proj_type) == \
        (True, 0.9, 7, "mlp")


def test_every_combination_the_paper_uses_is_registered_and_nonsense_fails():
    for backbone in ("R50", "VITS16MOCO", "VITB16", "VITT16"):
        for objective in ("CL2L", "BARLIP", "SIAMLIP", "BYOLIP", "SWALIP"):
            models.parse_model_name(f"CL2L_{backbone}_{objective}")
        models.parse_model_name(f"CLIP_{backbone}_SIGLIP")
    with pytest.raises(models.ModelNameError, match="not defined for base CLIP"):
        models.parse_model_name("CLIP_VITT16_BARLIP")
    with pytest.raises(models.ModelNameError, match="not defined for base CL2L"):
        models.parse_model_name("CL2L_VITT16_SIGLIP")


@pytest.mark.parametrize("flags,message", [
    ("--model CL2L_VITT16_SWALIP --num-augs 1", "SWALIP swaps predictions"),
    ("--model CL2L_VITT16_BARLIP --momentum", "--momentum: used only by BYOLIP and SIAMLIP; CL2L_VITT16_BARLIP"),
    ("--model CLIP_VITT16_CLIP --num-augs 2", "--num-augs: used only by the multi-view CL2L-base models"),
    ("--model CL2L_VITT16_CL2L --num-augs 3 --byol-augment", "--byol-augment defines exactly 2"),
    ("--model CL2L_VITT16_CL2L --blur-prob 1.5", "--blur-prob must be in"),
    ("--model CLIP_R50_CLIP --patch-dropout 0.5", "--patch-dropout drops ViT patch tokens; backbone R50 of "
                                                   "CLIP_R50_CLIP has none (ViT backbones: VITT16, "),
    ("--model CL2L_RN50_CL2L --patch-dropout 0.1", "backbone RN50 of CL2L_RN50_CL2L has none"),
    ("--model CLIP_VITT16_CLIP --patch-dropout 1", "--patch-dropout must be in [0, 1), got 1.0"),
    ("--model CLIP_VITT16_CLIP --patch-dropout -0.1", "--patch-dropout must be in [0, 1), got -0.1"),
])
def test_nonsense_flags_fail_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit):
        main.parse_args(shlex.split(flags))
    assert message in capsys.readouterr().err


# facebookresearch/clip-rocket repro_exps.txt, commit ebd9e58 (launcher flags --nodes/--use_volta32 and data paths
# dropped)
PAPER_COMMANDS = [
    "--model CL2L_R50_CL2L --dataset cc3m --wd 0.5 --name CL2L_R50_CLIP-CC3M-drop_0.2-layers_6-text_weak_strong "
    "--separate-proj --label-smoothing 0.1 --transformer-layers 6 --text-dropout-prob 0.2 --text-augment",
    "--model CL2L_R50_CL2L --dataset cc12m --name CL2L_R50_CLIP-CC12M-smooth_0.1-drop_0.05 --separate-proj "
    "--text-dropout-prob 0.05 --text-augment --loss-avg-or-sum sum --label-smoothing 0.1",
    "--model CL2L_R50_CL2L --dataset yfcc15m --name CL2L_R50_CLIP-YFCC-smooth_0.1-drop_0.0-rmsw_0.9 --separate-proj "
    "--remove-stopwords-prob 0.9 --text-dropout-prob 0.0 --text-augment --clean-before-augment "
    "--loss-avg-or-sum sum --label-smoothing 0.1",
    "--model CL2L_VITS16MOCO_CL2L --dataset yfcc15m --name CL2L_VITS16MOCO_CLIP-YFCC-smooth_0.1-drop_0.0 "
    "--separate-proj --text-dropout-prob 0.0 --text-augment --clean-before-augment --loss-avg-or-sum sum "
    "--label-smoothing 0.1 --checkpoint-grad --epochs 25 --seed 10",
    "--model CL2L_VITB16_CL2L --dataset yfcc15m --name CL2L_VITB16_CLIP-YFCC-smooth_0.1-drop_0.0 --separate-proj "
    "--text-dropout-prob 0.0 --text-augment --clean-before-augment --loss-avg-or-sum sum --label-smoothing 0.1 "
    "--checkpoint-grad",
    "--model CL2L_R50_CL2L --dataset merged-29m --name CL2L_R50_CLIP-MERGED-smooth_0.1-drop_0.0-lr_0.002-mc_192 "
    "--caption-sampling multi --lr 2e-3 --multicrop-resize 192 --separate-proj --text-dropout-prob 0.0 "
    "--text-augment --clean-before-augment --loss-avg-or-sum sum --label-smoothing 0.1",
] + [
    f"--model CL2L_{bb}_{obj} --dataset yfcc15m --separate-proj --text-dropout-prob 0.0 --text-augment "
    f"--clean-before-augment --loss-avg-or-sum sum --label-smoothing {ls} {extra}"
    for bb, child in (("R50", ""), ("VITS16MOCO", "--separate-proj-child"))
    for obj, ls, extra in (("BARLIP", 0.1, "--checkpoint-grad"), ("SIAMLIP", 0.1, "--momentum"), ("SIAMLIP", 0.1, ""),
                           ("SWALIP", 0.0, ""))
    for extra in [f"{extra} {child}"]
] + [
    f"--model CL2L_R50_{obj} --dataset cc3m --wd 0.5 --separate-proj --transformer-layers 6 --text-dropout-prob 0.2 "
    f"--text-augment --label-smoothing {ls} {extra}"
    for obj, ls, extra in (("BARLIP", 0.1, "--checkpoint-grad"), ("SIAMLIP", 0.1, "--checkpoint-grad"),
                           ("SIAMLIP", 0.1, "--momentum --checkpoint-grad"), ("SWALIP", 0.0, ""))
] + [
    f"--model CL2L_R50_{obj} --dataset cc12m --separate-proj --text-dropout-prob 0.1 --text-augment "
    f"--loss-avg-or-sum sum --checkpoint-grad --label-smoothing {ls} {extra}"
    for obj, ls, extra in (("BARLIP", 0.1, ""), ("SIAMLIP", 0.1, ""), ("SIAMLIP", 0.1, "--momentum"),
                           ("SWALIP", 0.0, ""))
]


@pytest.mark.parametrize("command", PAPER_COMMANDS)
def test_paper_commands_parse(command):
    args = main.parse_args(shlex.split(command))
    spec = models.parse_model_name(args.model)
    assert registry.num_augs(spec, args) == 2
    recipe = registry.recipe_from_flags(vars(args))
    assert registry.config_from_flags(vars(args))["kwargs"]["recipe"] == dataclasses.asdict(recipe)
    assert recipe.separate_proj and recipe.text_dropout_prob == args.text_dropout_prob
    assert recipe.momentum == ("--momentum" in command)


OBJECTIVE_NAMES = ["CL2L_VITT16_CL2L", "CL2L_VITT16_BARLIP", "CL2L_VITT16_SIAMLIP", "CL2L_VITT16_BYOLIP",
                   "CL2L_VITT16_SWALIP", "CLIP_VITT16_SWALIPV1", "CLIP_VITT16_SIGLIP", "CNCLIP_VITT16_SIGLIP"]
TINY_FLAGS = ["--image-size", "32", "--transformer-layers", "1", "--text-width", "64", "--text-heads", "2",
              "--batch-size", "8", "--dataset", "synthetic", "--text-augment", "--synonym-replacement-prob", "0",
              "--lr", "1e-3"]
# tiny heads, each family only where it is read (anything else is refused at parse time)
CL2L_TINY = ["--separate-proj", "--cl2l-hidden-dim", "32"]
SIAM_TINY = CL2L_TINY + ["--siamlip-hidden-dim", "32", "--siamlip-proj-dim", "8"]
TINY_HEADS = {"CL2L": CL2L_TINY, "SWALIP": CL2L_TINY, "SIAMLIP": SIAM_TINY, "BYOLIP": SIAM_TINY,
              "BARLIP": CL2L_TINY + ["--barlip-hidden-dim", "32", "--barlip-proj-dim", "16"],
              "SWALIPV1": ["--swalip-hidden-dim", "32", "--swalip-num-proto", "10", "--swalip-freeze-proto-iters", "1"]}


EXTRA_FLAGS = {  # each name once; the option paths ride along
    "CL2L_VITT16_SIAMLIP": ["--momentum", "--momentum-tau-schedule", "cosine", "--separate-proj-child"],
    "CL2L_VITT16_BARLIP": ["--separate-proj-child", "--clip-proj-type", "mlp", "--clip-hidden-dim", "32"],
    "CLIP_VITT16_SWALIPV1": ["--swalip-learn-temperature", "--swalip-no-shared-proto"],
    "CL2L_VITT16_SWALIP": ["--num-augs", "3", "--patch-dropout", "0.5"],  # patch dropout on strong views too
    "CNCLIP_VITT16_SIGLIP": ["--siglip-chunked"],
    "CL2L_VITT16_CL2L": ["--byol-augment", "--randaugment", "--caption-sampling", "multi", "--clean-before-augment"],
}


@pytest.mark.parametrize("name,extra", [(n, EXTRA_FLAGS.get(n, [])) for n in OBJECTIVE_NAMES] + [
    ("CL2L_VITT16_CL2L", ["--num-augs", "0", "--text-drop-path-prob", "0.1", "--text-dropout-prob", "0.1"]),
])
def test_every_objective_trains_two_steps(name, extra):
    args = main.parse_args(["--model", name, *TINY_FLAGS, *TINY_HEADS.get(name.split("_")[-1], []), *extra])
    spec = models.parse_model_name(name)
    model = models.build_from_config(registry.config_from_flags(vars(args)))
    tokenizer = datasets.build_tokenizer(spec.base.tokenizer, spec.base.context_length)
    dataset = datasets.build_train_dataset(spec, args, readers.build_reader("synthetic", "train"), 32, tokenizer)
    criterion = losses.build_criterion(spec, args, utils.DistEnv())
    if "--siglip-chunked" in extra:
        assert isinstance(criterion, losses.ChunkedSIGLIPLoss)
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.wd), lr=args.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = DataLoader(dataset, batch_size=8, sampler=datasets.ResumableSampler(len(dataset), 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, batch in zip(range(2), loader):
        step_config = engine.StepConfig.from_args(args, torch.device("cpu"))
        loss_dict = engine.forward_backward(model, criterion, [batch], step_config, scaler)
        assert torch.isfinite(loss_dict["loss"]), loss_dict
        assert set(spec.objective.metric_names) - {"clip_loss_image_local", "clip_loss_text_local",
                                                   "clip_acc_image_local", "clip_acc_text_local"} <= set(loss_dict)
        model.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        model.after_optimizer_step(step + 1, 2)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("visual.") for n in moved) and any(n.startswith("text.") for n in moved)
    if getattr(model, "target", None) is not None:  # the EMA moved the target network, without gradients
        assert any(n.startswith("target.") for n in moved)


@pytest.mark.slow
def test_main_end_to_end_cl2l_reports_z_h_and_blends(tmp_path):
    out = str(tmp_path / "experiments")
    flags = ["--model", "CL2L_VITT16_CL2L", "--dataset", "digits", "--image-size", "32", "--batch-size", "8",
             "--epochs", "1", "--workers", "0", "--transformer-layers", "1", "--text-width", "64",
             "--text-heads", "2", "--print-freq", "1", "--lr", "1e-3", "--output-dir", out, "--name", "cl2l",
             "--separate-proj", "--cl2l-hidden-dim", "32", "--text-augment", "--synonym-replacement-prob", "0",
             "--label-smoothing", "0.1", "--update-freq", "2", "--max-steps", "2"]
    summary = main.main(flags)
    assert summary["step"] == 2
    evaluated = main.main(flags + ["--evaluate"])
    assert {"acc1_z", "acc1_h", "acc1_zh_0.5"} <= set(evaluated)


# --------------------------------------------------------------------------- two gloo ranks == one process
def _loss_modules():
    return {"clip": losses.CLIPLoss(label_smoothing=0.1), "cl2l": losses.CL2LLoss(label_smoothing=0.1),
            "barlip": losses.BARLIPLoss(), "swalip": losses.SWALIPLoss(), "swalipv1": losses.SWALIPV1Loss(),
            "siglip": losses.SIGLIPLoss()}


def _fixed_outputs(n=8, a=2, d=6, p=5, k=4):
    """Deterministic outputs of every family (unit embeddings, BN-like v, prototype scores) for n samples."""
    g = torch.Generator().manual_seed(0)

    def u(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    return {"image_embed": u(n, d), "text_embed": u(n, d), "image_strong_embed": u(n, a, d),
            "text_strong_embed": u(n, a, d), "v_image": torch.randn(n, p, generator=g),
            "v_text": torch.randn(n, p, generator=g), "v_image_strong": torch.randn(n, a, p, generator=g),
            "v_text_strong": torch.randn(n, a, p, generator=g), "p_image": u(n, d) @ u(k, d).t(),
            "p_text": u(n, d) @ u(k, d).t(), "logit_scale": torch.tensor(12.0), "h_logit_scale": torch.tensor(9.0),
            "swalip_logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-3.0)}


def _all_families_at_rank(rank, world):
    import utils

    results = {}
    for name, module in _loss_modules().items():
        module.gather, module.rank = utils.all_gather_with_grad, rank
        results[name] = loss_and_grads(module, _fixed_outputs(), rank, world)
    return results


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Every recipe loss under 2 real gloo ranks (all_gather_with_grad): the mean of the rank losses and the
    DDP-averaged gradients equal one process holding the whole batch."""
    ranks = run_gloo_ranks(_all_families_at_rank, 2, tmp_path)
    for name, module in _loss_modules().items():
        loss, grads = loss_and_grads(module, _fixed_outputs())
        assert (ranks[0][name][0] + ranks[1][name][0]) / 2 == pytest.approx(loss, rel=1e-5), name
        for key, grad in grads.items():
            if grad.ndim:  # per-sample inputs: rank r holds rows r*b..(r+1)*b
                got = torch.cat([ranks[0][name][1][key], ranks[1][name][1][key]])
            else:  # shared scalars: DDP sums the per-rank means
                got = ranks[0][name][1][key] + ranks[1][name][1][key]
            assert torch.allclose(got, grad, atol=1e-6, rtol=1e-4), (name, key)


def test_vit_strong_views_must_match_the_image_size():
    args = main.parse_args(["--model", "CL2L_VITT16_CL2L", "--multicrop-resize", "24"])
    spec = models.parse_model_name(args.model)
    with pytest.raises(SystemExit, match="takes one input size"):
        datasets.build_train_dataset(spec, args, readers.build_reader("synthetic", "train"), 32, None)
