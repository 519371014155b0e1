"""Benchmarks: `python bench.py <subcommand> [flags]`; results go to BENCHMARKS.md by hand.

Each subcommand is a function registered with `@subcommand(name, add_args)`; it prints a Markdown
table and returns a dict (also written as JSON with --json PATH). Speed and memory are measured
here, never in unit tests. Subcommands compare against the peer implementation side by side in one
process (open_clip for training, the Chinese-CLIP pipeline for data and retrieval).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Callable

import torch

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[argparse.ArgumentParser], None]]] = {}


def subcommand(name: str, add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `fn(args) -> dict` as `python bench.py <name>` with its flags from `add_args(parser)`."""

    def wrap(fn):
        SUBCOMMANDS[name] = (fn, add_args)
        return fn

    return wrap


def machine_line() -> str:
    """One line naming the machine, for BENCHMARKS.md."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"{platform.node()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads"
            f" | {dev} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys -> a Markdown table (floats to 3 significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser("CLIP Lab benchmarks")
    parser.add_argument("--json", default=None, help="also write the result dict to this JSON file")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name))
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}")
    result = SUBCOMMANDS[args.command][0](args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


# --------------------------------------------------------------------------- subcommands below


if __name__ == "__main__":
    main(sys.argv[1:])
