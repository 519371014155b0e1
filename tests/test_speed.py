"""Speed levers that must stay exact: MFU logging (FLOP count, peak table) and compile with bucketed text lengths."""
import copy
import glob
import json

import pytest
import torch
from conftest import TINY_RUN
from test_launch import read_wandb_offline, wandb_history
from torch._dynamo.utils import counters

import engine
import losses
import main
import models


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model(models.parse_model_name("CLIP_VITT16_CLIP"), image_size=32, text_layers=1).train()


def analytic_train_flops(model, image_size: int, length: int) -> float:
    """Forward + backward matmul FLOPs of one sample by hand (2 FLOPs per multiply-add): a transformer block over
    N tokens of width W does 24 N W^2 (qkv 3 W^2, out W^2, MLP 8 W^2) + 4 N^2 W (QK^T, AV); the backward twice the
    forward, but attention's backward 2.5x (torch's SDPA formula counts the recomputed QK^T) and no input gradient
    for the patch embedding (images need none)."""
    width, depth, patch = model.visual.embed_dim, len(model.visual.blocks), model.visual.patch_embed.patch_size[0]
    patches = (image_size // patch) ** 2
    text_width, text_depth = model.text.width, len(model.text.resblocks)
    dim = model.image_projection.out_features
    conv = 2 * patches * 3 * patch * patch * width

    def matmuls(n, w):
        return 24 * n * w * w

    def attention(n, w):
        return 4 * n * n * w

    dense = depth * matmuls(patches + 1, width) + text_depth * matmuls(length, text_width) \
        + 2 * (width + text_width) * dim  # + the two projections
    attn = depth * attention(patches + 1, width) + text_depth * attention(length, text_width)
    return 3 * dense + 3.5 * attn + 2 * conv


def test_counted_train_flops_equal_the_analytic_count_and_leave_the_model_untouched():
    model = tiny_clip()
    sample = (torch.randn(3, 32, 32), torch.randint(1, 1000, (77,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops = engine.count_train_flops(model, sample, 77)
    for length in (1, 16, 30, 77):
        assert flops.per_sample(length) == pytest.approx(analytic_train_flops(model, 32, length), rel=1e-3)
    assert torch.equal(rng, torch.get_rng_state())  # no draw from the global RNG (resume stays exact)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    batch = (torch.randn(6, 3, 32, 32), torch.ones(6, 20, dtype=torch.int64))
    assert flops.of_batch(batch) == pytest.approx(6 * flops.per_sample(20))


def test_frozen_image_tower_counts_no_backward_through_it():
    """--freeze-vision: the image tower and its projection get no gradient, so their backward (2x the forward,
    2.5x for attention, 1x for the patch embedding's weight) leaves the count."""
    model = tiny_clip()
    sample = (torch.randn(3, 32, 32), torch.randint(1, 1000, (77,)))
    full = engine.count_train_flops(model, sample, 77).per_sample(77)
    engine.freeze_vision(model)
    frozen = engine.count_train_flops(model, sample, 77).per_sample(77)
    width, depth, n = model.visual.embed_dim, len(model.visual.blocks), (32 // 16) ** 2 + 1
    dense = depth * 24 * n * width ** 2 + 2 * width * model.image_projection.out_features
    attn = depth * 4 * n * n * width
    conv = 2 * (n - 1) * 3 * 16 * 16 * width
    assert full - frozen == pytest.approx(2 * dense + 2.5 * attn + conv, rel=1e-3)


def test_log_rows_carry_tflops_per_s_and_mfu(tmp_path):
    """Every --print-freq row of log.txt has tflops_per_s (model FLOPs of the window's batches / its time) and mfu
    against --peak-tflops; without the flag on CPU, against the measured matmul peak. The console line (train.log
    is its copy) and the wandb points (offline run) carry them too."""
    base = TINY_RUN + ["--output-dir", str(tmp_path), "--max-steps", "2", "--val-dataset", "none"]
    main.main(base + ["--name", "peak", "--peak-tflops", "0.5", "--wandb"])
    main.main(base + ["--name", "measured"])
    console = (tmp_path / "peak" / "train.log").read_text()
    assert "against 0.5 TFLOP/s (--peak-tflops)" in console and console.count("TFLOP/s | MFU ") == 2
    (wandb_file,) = glob.glob(str(tmp_path / "peak" / "wandb" / "offline-run-*" / "run-*.wandb"))
    points = [h for h in wandb_history(read_wandb_offline(wandb_file)) if "mfu" in h]
    assert [p["global_step"] for p in points] == [1, 2] and all(p["tflops_per_s"] > 0 for p in points)
    model = tiny_clip()
    low, high = (analytic_train_flops(model, 32, n) for n in (1, 77))
    for name in ("peak", "measured"):
        rows = [json.loads(line) for line in open(tmp_path / name / "log.txt") if '"train"' in line]
        assert len(rows) == 2
        for row in rows:
            per_sample = row["tflops_per_s"] * 1e12 / row["samples_per_s"]
            assert low * 0.99 < per_sample < high * 1.01
            assert 0 < row["mfu"] < 1
            if name == "peak":
                assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 0.5)


def test_gpu_peak_table_by_device_name():
    assert engine.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # SXM5
    assert engine.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert engine.gpu_peak_tflops("NVIDIA H200", "fp16") == 989.5
    assert engine.gpu_peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert engine.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert engine.gpu_peak_tflops("NVIDIA A100 80GB PCIe", "bf16") == 312.0
    assert engine.gpu_peak_tflops("NVIDIA A10G", "bf16") == 70.0  # not the A100 row
    assert engine.gpu_peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert engine.gpu_peak_tflops("Tesla V100-PCIE-16GB", "fp16") == 112.0
    assert engine.gpu_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 units
    assert engine.gpu_peak_tflops("NVIDIA L40S", "bf16") == 362.05
    assert engine.gpu_peak_tflops("NVIDIA GeForce RTX 4090", "fp32") == 82.6
    assert engine.gpu_peak_tflops("Some Future GPU", "bf16") is None
    assert engine.peak_flops(torch.device("cpu"), "fp32", 2.5) == (2.5e12, "--peak-tflops")
    measured, source = engine.peak_flops(torch.device("cpu"), "fp32")
    assert measured > 1e8 and "measured" in source


@pytest.mark.parametrize("argv", [["--text-bucket", "0"], ["--peak-tflops", "0"]])
def test_bad_speed_flags_fail_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit):
        main.parse_args(argv)
    assert "--text-bucket must be >= 1 and --peak-tflops > 0" in capsys.readouterr().err


def test_trim_padding_rounds_up_to_the_bucket():
    tokens = torch.zeros(2, 77, dtype=torch.int64)
    tokens[0, :5], tokens[1, :3] = 7, 9
    assert models.trim_padding(tokens).shape[-1] == 5
    assert models.trim_padding(tokens, 16).shape[-1] == 16
    tokens[1, :17] = 9
    assert models.trim_padding(tokens, 16).shape[-1] == 32
    tokens[0, :70] = 7
    assert models.trim_padding(tokens, 16).shape[-1] == 77  # never past the context
    assert engine.text_bucket(None, compiled=True) == 16 and engine.text_bucket(None, compiled=False) == 1
    assert engine.text_bucket(8, compiled=True) == 8


def bpe_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and (B, 77) token rows padded with 0 after EOT (the largest id), the i-th row of length lengths[i]."""
    tokens = torch.zeros(len(lengths), 77, dtype=torch.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n - 1] = torch.randint(1, 1000, (n - 1,))
        tokens[i, n - 1] = 49407
    return torch.randn(len(lengths), 3, 32, 32), tokens


def test_compiled_model_on_bucketed_text_equals_eager_with_one_graph_per_bucket():
    """--compile with --text-bucket 16: batches whose captions end at 11 and 27 tokens run as 16 and 32 columns,
    one static graph each (counted by dynamo), and the compiled loss and gradients equal eager's on the exactly
    trimmed batch. backend aot_eager (dynamo + AOTAutograd graphs, no inductor codegen): inductor works on this
    CPU but compiles ~35 s per graph on 2 shared cores; test_train's --compile test runs inductor end to end."""
    eager = tiny_clip()
    compiled = copy.deepcopy(eager)
    criterion = losses.CLIPLoss()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8):
        assert engine.compile_model(compiled, 16, 77, backend="aot_eager") == 10  # 2 x ceil(77 / 16) graphs
        for lengths, bucket in (([11, 6, 9, 4], 16), ([27, 5, 12, 20], 32)):
            torch.manual_seed(1)
            images, tokens = bpe_batch(lengths)
            bucketed = engine.to_device((images, tokens), torch.device("cpu"), 16)
            assert bucketed[1].shape[-1] == bucket
            results = []
            for model, batch in ((compiled, bucketed), (eager, engine.to_device((images, tokens),
                                                                                torch.device("cpu")))):
                model.zero_grad(set_to_none=True)
                loss = criterion(model(*batch))["loss"]
                loss.backward()
                results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
            for name, grad in results[0][1].items():
                torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-4,
                                           msg=lambda m, name=name: f"{name}: {m}")
        assert counters["stats"]["unique_graphs"] == 2
        assert torch._dynamo.config.recompile_limit == 10


def test_peak_tflops_does_not_make_another_run():
    """--peak-tflops changes only the logged mfu: a resume with another value continues the same run."""
    old = main.args_dict(main.parse_args([]))
    assert main.flags_diff(old, main.parse_args(["--peak-tflops", "989.5"])) == {}
    assert main.flags_diff(old, main.parse_args(["--text-bucket", "8"])) == {"text_bucket": (None, 8)}
