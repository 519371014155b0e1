"""CUDA paths: xformers attention, exact accumulation, NCCL DDP, bf16/fp16, torch.compile, resume.

Skipped on machines without a GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py` (scripts/gpu_checks.sh does, and records what it ran).
"""
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN

import engine
import losses
import main
import models
import utils

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=2).to(CUDA)


def tiny_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 32, 32, generator=g).to(CUDA),
            torch.randint(1, 5000, (n, 77), generator=g).to(CUDA))  # (B, 3, H, W), (B, L)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * float(b[name].abs().max()) + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_attention_matches_sdpa_in_bf16(causal):
    if not models.xformers_usable(CUDA):
        pytest.skip("xformers not installed, or installed without CUDA kernels for this torch (SDPA is used)")
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(4, 8, 77, 64, device=CUDA, generator=g, dtype=torch.bfloat16) for _ in range(3))
    ours = models.multi_head_attention(q, k, v, causal=causal)  # xformers path: bf16 on CUDA
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    torch.testing.assert_close(ours.float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_exact_accumulation_on_cuda_equals_one_batch(precision, rtol):
    model, (images, tokens) = tiny_model(), tiny_batch()
    ns = main.parse_args(["--accum-mode", "exact", "--precision", precision])
    step = engine.StepConfig.from_args(ns, CUDA)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    engine.forward_backward(model, losses.CLIPLoss(), list(zip(images.chunk(4), tokens.chunk(4))), step, scaler)
    assert model.text.token_embedding.weight.grad.layout == torch.strided
    accumulated = grads(model)
    model.zero_grad(set_to_none=True)
    engine.forward_backward(model, losses.CLIPLoss(), [(images, tokens)], step, scaler)
    assert_grads_match(accumulated, grads(model), rtol)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_ddp_exact_accumulation_with_sparse_embedding_grads_equals_one_batch(monkeypatch):
    """DDP over NCCL (world size 1): the unsynced micro-batches' sparse embedding gradients and the synced
    dense one reach DDP's reduction as one dense gradient equal to the one-batch gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    utils.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        reference, (images, tokens) = tiny_model(), tiny_batch()
        ddp = DistributedDataParallel(tiny_model(), device_ids=[CUDA.index])
        ns = main.parse_args(["--accum-mode", "exact"])
        step = engine.StepConfig.from_args(ns, CUDA)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        engine.forward_backward(ddp, losses.CLIPLoss(), list(zip(images.chunk(4), tokens.chunk(4))), step, scaler)
        engine.forward_backward(reference, losses.CLIPLoss(), [(images, tokens)], step, scaler)
        assert_grads_match(grads(ddp.module), grads(reference), 1e-4)
    finally:
        dist.destroy_process_group()


def run_args(tmp_path, *extra: str) -> list[str]:
    return TINY_RUN + ["--output-dir", str(tmp_path), "--device", "cuda", "--warmup-epochs", "0", *extra]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    summary = main.main(run_args(tmp_path, "--precision", precision, "--max-steps", "6", "--update-freq", "2",
                                 "--batch-size", "4", "--name", precision))
    assert summary["step"] == 6
    ckpt = torch.load(tmp_path / precision / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (ckpt["scaler"] != {}) == (precision == "fp16")  # GradScaler state only for fp16


def test_compile_on_cuda_matches_eager(tmp_path):
    base = run_args(tmp_path, "--max-steps", "2", "--update-freq", "2", "--batch-size", "4", "--eps", "1e-2")
    main.main(base + ["--name", "compiled", "--compile"])
    main.main(base + ["--name", "eager"])
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu",  # noqa: E731
                                   weights_only=True)["model"]
    compiled, eager = load("compiled"), load("eager")
    assert compiled.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_resume_on_cuda_continues_the_run(tmp_path):
    """4 steps straight vs 2 steps, a new main() call on the same folder, 2 more: the same parameters (CUDA
    kernels with atomics make this equal to float noise, not bitwise)."""
    straight = run_args(tmp_path, "--max-steps", "4", "--name", "straight", "--eps", "1e-2")
    split = run_args(tmp_path, "--name", "split", "--eps", "1e-2")
    main.main(straight)
    main.main(split + ["--max-steps", "2"])
    main.main(split + ["--max-steps", "4"])
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu",  # noqa: E731
                                   weights_only=True)
    a, b = load("straight"), load("split")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")



def test_an_xformers_wheel_without_cuda_kernels_falls_back_to_sdpa(monkeypatch):
    """The PyPI xformers wheel imports but has no kernels for this torch: attention must still run (SDPA)."""
    class Broken:
        @staticmethod
        def memory_efficient_attention(*args, **kwargs):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
    monkeypatch.setattr(models, "xops", Broken)
    monkeypatch.setattr(models, "_xformers_runs", None)
    q = torch.randn(2, 4, 10, 32, device=CUDA, dtype=torch.bfloat16)
    out = models.multi_head_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    assert models._xformers_runs is False


def test_mfu_is_logged_against_the_datasheet_peak_of_this_gpu(tmp_path):
    """bf16 on a GPU of engine.GPU_PEAK_TFLOPS: every progress row has mfu = tflops_per_s / the table's peak; an
    unknown GPU logs tflops_per_s without mfu (pass --peak-tflops)."""
    import json

    main.main(run_args(tmp_path, "--max-steps", "2", "--precision", "bf16") + ["--name", "mfu"])
    rows = [json.loads(line) for line in open(tmp_path / "mfu" / "log.txt") if '"train"' in line]
    peak = engine.gpu_peak_tflops(torch.cuda.get_device_name(CUDA), "bf16")
    assert rows and all(r["tflops_per_s"] > 0 for r in rows)
    for r in rows:
        if peak is None:
            assert "mfu" not in r
        else:
            assert r["mfu"] == pytest.approx(r["tflops_per_s"] / peak)
