"""Shared test set-up: offline, wandb offline, repository root importable, tiny-run helpers."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# flags of a tiny, fast training run (a few seconds on 2 cores)
TINY_RUN = ["--model", "CLIP_VITT16_CLIP", "--dataset", "synthetic", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--transformer-layers", "1", "--print-freq", "1", "--lr", "1e-3"]


def loss_and_grads(module, outputs: dict, rank: int = 0, world: int = 1) -> tuple[float, dict]:
    """Loss and input gradients of loss `module` on rank `rank`'s slice of `outputs` (per-sample tensors split
    into `world` equal row blocks, scalars shared); gradients divided by world (DDP's mean)."""
    b = outputs["image_embed"].shape[0] // world
    local = {k: (v[rank * b:(rank + 1) * b] if v.ndim else v).clone().requires_grad_() for k, v in outputs.items()}
    out = module(local)
    out["loss"].backward()
    return out["loss"].detach().item(), {k: v.grad / world for k, v in local.items() if v.grad is not None}


def _gloo_rank(rank: int, world: int, init_file: str, result_prefix: str, fn) -> None:
    import torch.distributed as dist

    import utils

    utils.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), f"{result_prefix}{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(fn, world: int, tmp_path) -> list:
    """`fn(rank, world)` in `world` spawned processes joined by a real gloo process group; returns their results
    (tensors, numbers, dicts and lists of them) in rank order. `fn` must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, str(tmp_path / "gloo_init"), str(tmp_path / "gloo_rank"), fn), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"gloo_rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture
def tiny_run_args(tmp_path):
    """Flags of a tiny run writing into a temporary experiments root."""
    return TINY_RUN + ["--output-dir", str(tmp_path / "experiments")]


@pytest.fixture(scope="session")
def muge_sample_root(tmp_path_factory) -> str:
    """A data root holding `muge-sample/` (tsv + jsonl + LMDB of ~340 real images with Chinese captions), built
    once per session by scripts/make_muge_sample.py: pass it as --data-root / data_root=."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_muge_sample", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                                         "make_muge_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("data_root")
    module.make_muge_sample(str(root / "muge-sample"))
    return str(root)


def forked_lookups(lookup, items: list, workers: int = 2) -> list[list]:
    """`[lookup(x) for x in items]` in `workers` processes forked now, started together; each returns its list (or
    the repr of the exception it died of)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(workers)

    def child(rank: int) -> None:
        barrier.wait()
        try:
            queue.put((rank, [lookup(x) for x in items]))
        except Exception as exc:  # noqa: BLE001 -- reported to the parent, which fails the test with it
            queue.put((rank, repr(exc)))

    procs = [ctx.Process(target=child, args=(r,)) for r in range(workers)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(workers)]
