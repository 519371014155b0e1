"""Ablation tables and plots from experiment folders: `python report.py [--root experiments] [--table NAME]
[--format md|csv|latex] [--plot DIR] [--wandb]`.

Which experiment belongs to which table: repro_exps.txt's `# table: NAME` groups list the expected experiments
(their `--name` + sweep suffixes); any other folder whose args.json has `"table": NAME` (main.py --table, set by
the repro commands) joins that table. A row is one configuration; runs that differ only in `--seed` (names
`..._seed<N>`) are its seeds and are shown as mean ± std. The first row of each table is its baseline; every other
row shows its delta against it. Missing runs (no folder) and failed or unfinished ones (no summary.json; with
Slurm, the ledger's last job state) are marked. Metrics come from each folder's summary.json (zero-shot top-1 and
retrieval mean recall on the run's validation set by default); `--wandb` also reads runs of `--wandb-project`
through `wandb.Api()` for experiments without a local summary. Reads files only: it imports no training code.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import sys

import launch

log = logging.getLogger("clip_lab.report")

BOOKKEEPING = {"epoch", "step", "best_metric", "train_time_s"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SEED_RE = re.compile(r"_seed[^_]+")


def row_key(name: str) -> str:
    """The configuration an experiment belongs to: its name without the `_seed<N>` sweep suffix."""
    return SEED_RE.sub("", name)


def load_experiment(exp_dir: str, ledger: list[dict]) -> dict:
    """{name, dir, args, summary, curve [(step, loss)], status} of one experiment folder."""
    name = os.path.basename(os.path.normpath(exp_dir))
    out = {"name": name, "dir": exp_dir, "args": {}, "summary": None, "curve": [], "status": "missing"}
    if not os.path.isdir(exp_dir):
        return out
    for key, fname in (("args", "args.json"), ("summary", "summary.json")):
        path = os.path.join(exp_dir, fname)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out[key] = json.load(f)
    path = os.path.join(exp_dir, "log.txt")
    if os.path.exists(path):
        points = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "train" and "loss" in rec:
                    points[rec["global_step"]] = rec["loss"]  # a resumed run re-logs steps: keep the last
        out["curve"] = sorted(points.items())
    if out["summary"] is not None:
        out["status"] = "done"
    elif any(f.startswith("nonfinite_") for f in os.listdir(exp_dir)):
        out["status"] = "failed (non-finite loss)"
    else:
        ids = [j for e in ledger if os.path.normpath(e.get("exp_dir", "")) == os.path.normpath(exp_dir)
               for j in e.get("job_ids", [])]
        state = launch.job_states(ids[-1:]).get(ids[-1]) if ids else None
        if state in FAILED_STATES:
            out["status"] = f"failed ({state.lower()})"
        elif state:
            out["status"] = state.lower()
        else:
            out["status"] = "incomplete"
    return out


def metrics_of(exp: dict, wanted: list[str] | None) -> dict[str, float]:
    """Numeric final metrics, named `<validation set>/<metric>`; default: zero-shot top-1 and mean recall."""
    summary = exp["summary"] or {}
    # the validation set main.py resolved (summary), else what the flags say
    val = summary.get("val_dataset") or exp["args"].get("val_dataset") or exp["args"].get("dataset") or \
        summary.get("dataset", "?")
    numeric = {k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING}
    keys = wanted or [k for k in numeric if k.startswith("acc1") or k == "mean_recall"] or sorted(numeric)
    return {f"{val}/{k}": numeric[k] for k in keys if k in numeric}


def build_tables(root: str, repro: str | None, only: str | None) -> dict[str, list[dict]]:
    """{table: [row]}; a row is {label, expected [names], runs [experiments]} (metrics: compute_metrics)."""
    ledger = launch.read_ledger(root)
    tables: dict[str, dict[str, dict]] = {}

    def row(table: str, label: str) -> dict:
        return tables.setdefault(table, {}).setdefault(label, {"label": label, "expected": [], "runs": []})

    if repro and os.path.exists(repro):
        for cmd in launch.read_repro(repro):
            base = launch.flag_value(cmd["argv"], "--name")
            if base is None:
                continue
            for _, suffix in launch.expand_sweep(cmd["argv"]):
                row(cmd["table"] or "untabled", row_key(base + suffix))["expected"].append(base + suffix)
    seen = set()
    for rows in tables.values():
        for r in rows.values():
            for name in r["expected"]:
                r["runs"].append(load_experiment(os.path.join(root, name), ledger))
                seen.add(name)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name in seen or not os.path.exists(os.path.join(root, name, "args.json")):
                continue
            exp = load_experiment(os.path.join(root, name), ledger)
            row(exp["args"].get("table") or "untabled", row_key(name))["runs"].append(exp)
    return {table: list(rows.values()) for table, rows in tables.items() if not only or table == only}


def compute_metrics(tables: dict[str, list[dict]], wanted: list[str] | None) -> None:
    """Set each row's metrics: {name: (mean, std, n)} over its finished runs (seeds)."""
    for rows in tables.values():
        for r in rows:
            values: dict[str, list[float]] = {}
            for exp in r["runs"]:
                if exp["status"] == "done":
                    for k, v in metrics_of(exp, wanted).items():
                        values.setdefault(k, []).append(v)
            r["metrics"] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                            for k, v in values.items()}


def add_wandb(tables: dict[str, list[dict]], project: str, entity: str | None) -> None:
    """Fill in summaries of experiments that have none locally from wandb runs of the same id (name)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    for table, rows in tables.items():
        runs = {r.name: r for r in api.runs(path, filters={"group": table})}
        for r in rows:
            for exp in r["runs"]:
                if exp["summary"] is None and exp["name"] in runs:
                    exp["summary"] = {k: v for k, v in runs[exp["name"]].summary._json_dict.items()
                                      if isinstance(v, (int, float))}
                    exp["args"] = {**dict(runs[exp["name"]].config), **exp["args"]}
                    exp["status"] = "done (wandb)"


# --------------------------------------------------------------------------- rendering
def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, text cells, raw records) of one table; the first row is the baseline."""
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    base = rows[0]["metrics"] if rows else {}
    header = ["experiment", "runs", *metrics]
    cells, records = [], []
    for i, r in enumerate(rows):
        n_done = sum(e["status"].startswith("done") for e in r["runs"])
        n_all = max(len(r["runs"]), 1)
        bad = sorted({e["status"] for e in r["runs"] if not e["status"].startswith("done")})
        runs = f"{n_done}/{n_all}" + (f" ({', '.join(bad)})" if bad else "")
        line, record = [r["label"] + (" (baseline)" if i == 0 else ""), runs], {"experiment": r["label"],
                                                                              "done": n_done, "runs": n_all,
                                                                              "status": ",".join(bad) or "done"}
        for k in metrics:
            if k not in r["metrics"]:
                line.append("missing" if n_done == 0 else "-")
                continue
            mean, std, n = r["metrics"][k]
            text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
            record[k] = mean
            record[f"{k} std"] = std
            if i > 0 and k in base:
                delta = mean - base[k][0]
                text += f" ({delta:+.2f})"
                record[f"{k} delta"] = delta
            line.append(text)
        cells.append(line)
        records.append(record)
    return header, cells, records


def render(tables: dict[str, list[dict]], fmt: str) -> str:
    """The tables as Markdown, CSV or LaTeX."""
    out = io.StringIO()
    if fmt == "csv":
        records = [{"table": t, **rec} for t, rows in tables.items() for rec in table_cells(rows)[2]]
        keys = list(dict.fromkeys(k for rec in records for k in rec))
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue()
    for table, rows in tables.items():
        header, cells, _ = table_cells(rows)
        if fmt == "md":
            out.write(f"### {table}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            for line in cells:
                out.write("| " + " | ".join(line) + " |\n")
            out.write("\n")
        else:  # latex
            esc = lambda s: re.sub(r"([_%&#$])", r"\\\1", s).replace("±", r"$\pm$")  # noqa: E731
            out.write(f"% table: {table}\n\\begin{{tabular}}{{l" + "r" * (len(header) - 1) + "}\n\\toprule\n")
            out.write(" & ".join(esc(h) for h in header) + r" \\" + "\n\\midrule\n")
            for line in cells:
                out.write(" & ".join(esc(c) for c in line) + r" \\" + "\n")
            out.write("\\bottomrule\n\\end{tabular}\n\n")
    return out.getvalue()


def plot(tables: dict[str, list[dict]], folder: str) -> list[str]:
    """Per table: `<table>_curves.png` (training loss vs global step) and `<table>_bar.png` (first metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for table, rows in tables.items():
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", table)
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            for exp in r["runs"]:
                if exp["curve"]:
                    steps, loss = zip(*exp["curve"])
                    ax.plot(steps, loss, label=exp["name"], linewidth=1)
        ax.set(xlabel="global step", ylabel="training loss", title=f"{table}: training curves")
        if ax.lines:
            ax.legend(fontsize=6)
        path = os.path.join(folder, f"{safe}_curves.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
        metric = next((k for r in rows for k in r["metrics"]), None)
        fig, ax = plt.subplots(figsize=(7, 4))
        if metric:
            labels = [r["label"] for r in rows]
            means = [r["metrics"].get(metric, (math.nan, 0, 0))[0] for r in rows]
            stds = [r["metrics"].get(metric, (0, 0.0, 0))[1] for r in rows]
            ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue")
            ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
            ax.set(ylabel=metric, title=f"{table}: {metric} (mean ± std over seeds)")
        path = os.path.join(folder, f"{safe}_bar.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> str:
    """Print the tables (and write plots); returns the printed text."""
    p = argparse.ArgumentParser("CLIP Lab ablation report")
    p.add_argument("--root", default="experiments", help="experiments root (run.sh's --output-dir)")
    p.add_argument("--exps", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "repro_exps.txt"),
                   help="repro file whose '# table:' groups define the tables, expected runs and baselines")
    p.add_argument("--table", default=None, help="only this table")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex"], help="output format")
    p.add_argument("--metrics", default=None, help="comma list of summary.json keys (default acc1*, mean_recall)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG curves and bar charts here")
    p.add_argument("--wandb", action="store_true", help="also read summaries of wandb runs (wandb.Api())")
    p.add_argument("--wandb-project", default="clip-lab", help="wandb project for --wandb")
    p.add_argument("--wandb-entity", default=None, help="wandb entity for --wandb")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tables = build_tables(args.root, args.exps, args.table)
    if args.table and not tables:
        raise SystemExit(f"no table {args.table!r} in {args.exps} or under {args.root}")
    if args.wandb:
        add_wandb(tables, args.wandb_project, args.wandb_entity)
    compute_metrics(tables, args.metrics.split(",") if args.metrics else None)
    text = render(tables, args.format)
    sys.stdout.write(text)
    if args.plot:
        for path in plot(tables, args.plot):
            log.info("wrote %s", path)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
