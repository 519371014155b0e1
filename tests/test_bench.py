"""Smoke tests of `bench.py train`, `data` and `retrieval`: a tiny run must still produce every reported field
(the bench must not rot).

Speed itself is measured by `python bench.py <command>` (results in BENCHMARKS.md), never asserted here.
"""
import json
import math

import pytest
import torch

import bench

TINY_TRAIN = ["train", "--model", "CLIP_VITT16_CLIP", "--image-size", "32", "--batch-size", "8",
              "--transformer-layers", "1", "--vision-layers", "1", "--steps", "1", "--warmup", "1",
              "--update-freq", "2", "--matmul-size", "128",
              "--matmul-seconds", "0.05", "--no-memory"]


def test_bench_train_reports_every_field(tmp_path):
    out = tmp_path / "train.json"
    result = bench.main(["--json", str(out)] + TINY_TRAIN + ["--patch-dropout", "0.5"])
    for key in ("step_s_ours", "step_s_ours_patch_dropout_0.5", "patch_dropout_speedup",
                "samples_per_s_ours", "train_GFLOP_per_sample_ours", "achieved_GFLOP_s_ours",
                "MFU_ours", "params_M_ours", "step_s_open_clip", "samples_per_s_open_clip",
                "train_GFLOP_per_sample_open_clip", "MFU_open_clip", "throughput_ratio", "peak_matmul_gflops",
                "train_step_s_k1", "train_step_s_k2", "accum_time_per_sample_ratio", "forward_backward_s_k1",
                "forward_backward_s_k2", "accum_fb_time_ratio", "open_clip_accum_time_per_sample_ratio",
                "open_clip_accum_fb_time_ratio", "load_avg_1min_before", "machine"):
        assert key in result, key
    numbers = [v for v in result.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) and v > 0 for v in numbers)
    # the peer has our dimensions: same parameter count up to open_clip's bias-free patch conv
    assert abs(result["params_M_ours"] - result["params_M_open_clip"]) < 0.01
    assert math.isclose(result["samples_per_s_ours"], 8 / result["step_s_ours"])
    assert json.loads(out.read_text())["model"] == "CLIP_VITT16_CLIP"


def test_bench_train_levers_table(capsys):
    """--levers: FLIP, compile-with-buckets (aot_eager here: no code generation) and chunked SigLIP side by side."""
    result = bench.main(TINY_TRAIN + ["--no-peer", "--no-accum", "--levers", "--compile-backend", "aot_eager",
                                      "--siglip-global-batch", "64", "--siglip-ranks", "2", "--siglip-dim", "16"])
    for key in ("patch_dropout_speedup", "compile_speedup", "siglip_chunked_mem_ratio",
                "step_s_ours_compiled_text_bucket", "siglip_loss_mem_MB_gathered", "siglip_loss_mem_MB_chunked"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["patch_dropout"] == 0.5 and result["compile_text_bucket"] == 16
    table = capsys.readouterr().out
    assert "| FLIP --patch-dropout 0.5 | train step (s) |" in table
    assert "| --compile (aot_eager) + --text-bucket 16 | train step (s) |" in table
    assert "| --siglip-chunked, N 64 on 2 ranks | loss memory (MB) |" in table


def test_bench_train_memory_child(capsys):
    """The per-configuration memory measurement (run in-process here to skip an interpreter start)."""
    args = bench.argparse.ArgumentParser()
    bench._add_train_args(args)
    ns = args.parse_args(TINY_TRAIN[1:])
    threads = torch.get_num_threads()
    cfg = {"args": vars(ns), "impl": "ours", "k": 2, "device": "cpu", "threads": threads}
    bench._memory_child(json.dumps(cfg))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"base_mb", "peak_mb", "act_mb"}
    assert line["peak_mb"] >= line["base_mb"] > 0


def test_open_clip_accumulation_peer_gives_the_full_batch_gradient():
    """The timed open_clip accumulation scheme is a real exact scheme: same gradient as one full batch."""
    parser = bench.argparse.ArgumentParser()
    bench._add_train_args(parser)
    s = bench._train_setup(parser.parse_args(TINY_TRAIN[1:]), torch.device("cpu"), with_peer=True)
    bench._peer_accum_step(s, torch.device("cpu"), 2)
    accumulated = [p.grad.clone() for p in s["peer"].parameters()]
    bench._peer_step(s, torch.device("cpu"), optimizer_step=False)
    for g, p in zip(accumulated, s["peer"].parameters(), strict=True):
        # the logit scale's graph is kept in every backward of the peer scheme: k times its gradient
        expected = p.grad * 2 if p is s["peer"].logit_scale else p.grad
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-8)


@pytest.mark.slow
def test_bench_siglip_loss_memory_runs_both_forms_on_gloo_ranks():
    """The SigLIP part of `bench.py objectives` at toy size: 2 gloo ranks per form, the same loss either way."""
    rows = bench._siglip_loss_memory(bench.argparse.Namespace(siglip_ranks=2, siglip_global_batch=64, siglip_dim=8))
    assert [r["form"] for r in rows] == ["gathered", "chunked (ring)"]
    assert [r["logits_MB"] for r in rows] == [32 * 64 * 4 / 2**20, 32 * 32 * 4 / 2**20]
    assert all(r["peak_MB"] > 0 and r["loss_mem_MB"] >= 0 for r in rows)
    assert math.isclose(rows[0]["mean_loss"], rows[1]["mean_loss"], rel_tol=1e-5)


@pytest.mark.slow
def test_bench_fsdp_holds_half_the_parameters_and_adam_state_per_rank(capsys):
    """`bench.py fsdp` at toy size: DDP and --fsdp on 2 gloo ranks; each FSDP rank holds half of every sharded
    parameter and of AdamW's moments (the 0-dim temperature stays whole: a few bytes)."""
    result = bench.main(["fsdp", "--model", "CLIP_VITT16_CLIP", "--image-size", "32", "--steps", "1"])
    assert [r["impl"] for r in result["rows"]] == ["ddp", "fsdp"]
    assert result["fsdp_over_ddp"]["params_mb"] == pytest.approx(0.5, abs=0.01)
    assert result["fsdp_over_ddp"]["adam_mb"] == pytest.approx(0.5, abs=0.01)
    assert all(r["step_s"] > 0 and r["peak_mb"] > 0 for r in result["rows"])
    assert "fsdp / ddp: params_mb 0.50" in capsys.readouterr().out


def test_bench_retrieval_reports_processes_compute_and_extraction(tmp_path):
    """`bench.py retrieval` at toy scale without the reference: our two processes, the floor, the compute
    ratio and the VITB16 extract throughput are all reported."""
    result = bench.main(["retrieval", "--images", "300", "--queries", "50", "--dim", "32", "--skip-reference",
                         "--extract-batches", "1", "--extract-batch-size", "2", "--workdir", str(tmp_path)])
    assert [r["pipeline"][:4] for r in result["rows"]] == ["ours", "ours", "bare"]
    assert all(r["total_s"] > 0 for r in result["rows"])
    measures = {r["measure"]: r["value"] for r in result["summary"]}
    assert measures["ours / floor (target <= 1.5)"] > 0
    assert any(m.startswith("VITB16 image feature extraction, fp32") and v > 0 for m, v in measures.items())
    # the tool's own path (LMDB, decode in workers, squash transform) next to the model alone
    assert result["extract_tool_images_per_s"] > 0 and result["extract_model_only_images_per_s"] > 0
    assert sum(1 for line in open(tmp_path / "ours.jsonl", encoding="utf-8")) == 50


def test_bench_data_reports_every_store_reader_and_ratio(tmp_path):
    """`bench.py data` at toy scale (4 photos, 1 round, 0 workers): one row per store x reader (LMDB, tar shards
    through our stream and through open_clip's get_wds_dataset), the ratios the issues set targets on and where
    the wds path's time goes, all finite; the numbers themselves are BENCHMARKS.md's business."""
    out = tmp_path / "data.json"
    bench.main(["--json", str(out), "data", "--images", "4", "--rounds", "1", "--workers", "0", "--batch-size", "2",
                "--resize", "64", "--image-size", "32", "--data-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    readers = ["raw bound (bytes in memory)", "ours: LmdbReader + draft", "Chinese-CLIP-style reader",
               "ours: WdsReader + draft (images)", "ours: wds StreamDataset (training path)",
               "open_clip get_wds_dataset"]
    assert sorted((r["store"], r["reader"], r["workers"]) for r in result["rows"]) == \
        sorted((s, r, 0) for s in ("full", "resized64") for r in readers)
    assert all(math.isfinite(r["images/s"]) and r["images/s"] > 0 for r in result["rows"])
    assert set(result["ratios"]) == {"ours / raw bound (full, 0 workers)", "ours / raw bound (resized64, 0 workers)",
                                     "ours / Chinese-CLIP-style (full 1024x768, 0 workers)",
                                     "ours / Chinese-CLIP-style (resized64, 0 workers)",
                                     "ours resized64 / ours full (0 workers)",
                                     "ours WdsReader / raw bound (full, 0 workers)",
                                     "ours WdsReader / raw bound (resized64, 0 workers)",
                                     "ours wds training path / raw bound (full, 0 workers)",
                                     "ours wds training path / raw bound (resized64, 0 workers)",
                                     "ours wds / open_clip wds (full, 0 workers)",
                                     "ours wds / open_clip wds (resized64, 0 workers)"}
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    for store in ("full", "resized64"):
        parts = result["wds_ms_per_image"][store]
        assert {"read tar records", "decode (draft)", "transform", "tokenize", "seed RNGs", "whole stream path",
                "rest"} <= parts.keys()
        assert all(parts[k] > 0 for k in ("read tar records", "decode (draft)", "transform", "whole stream path"))
    assert result["images"] == 4 and result["rounds"] == 1
