"""Ablation tables and plots from experiment folders: `python report.py [--root experiments] [--table NAME]
[--format md|csv|latex] [--metrics K1,K2] [--plot DIR] [--all] [--wandb]`, `python report.py --list` and
`python report.py --diff EXP_A EXP_B`.

Which experiment belongs to which table: repro_exps.txt's `# table: NAME` groups list the expected experiments
(their `--name` + sweep suffixes); any other folder whose args.json has `"table": NAME` (main.py --table, set by
the repro commands) joins that table. A row is one configuration; runs that differ only in `--seed` (names
`..._seed<N>`) are its seeds and are shown as mean ± std. The baseline of a table is its first row in the repro
file (a table known only from args.json, and runs outside any table, have none); every other row shows its delta
against it. A run counts when its summary.json says `finished` (or `evaluated`); stopped, failed, running and
missing runs are named in the `runs` column, never averaged in. Metrics come from summary.json (zero-shot top-1
and retrieval mean recall on the run's validation set by default), validation curves from log.txt. Torn or
blank lines, unreadable files and NaN/Inf metrics are warned about (file:line) and marked, never fatal.
`--wandb` also reads runs of `--wandb-project` through `wandb.Api()` for experiments without a local summary.
Reads files only: it imports no training code.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import logging
import math
import os
import re
import statistics
import sys

import experiment
import launch

log = logging.getLogger("clip_lab.report")

BOOKKEEPING = {"epoch", "step", "total_steps", "metrics_step", "best_metric", "train_time_s"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
DONE = (experiment.FINISHED, experiment.EVALUATED)
SEED_RE = re.compile(r"_seed[^_]+")
# flags that name or place a run rather than configure it: never "what differs" between two rows
PER_RUN_FLAGS = experiment.RESUME_NEUTRAL_ARGS | {"seed"}
PERCENT_RE = re.compile(r"^(acc|score|mean_recall|mfu|.*R@)")
# training speed, from log.txt's progress rows: `--metrics mfu` tabulates the median as `train/mfu` (in %)
SPEED_KEYS = ("mfu", "tflops_per_s", "samples_per_s")


def row_key(name: str) -> str:
    """The configuration an experiment belongs to: its name without the `_seed<N>` sweep suffix."""
    return SEED_RE.sub("", name)


# --------------------------------------------------------------------------- reading folders
def curves_of(records: list[dict]) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(training loss [(step, loss)], {metric: [(step, value)]} of every validation) from log.txt records; a
    resumed run re-logs steps, the last value of a step wins."""
    loss: dict[int, float] = {}
    tests: dict[str, dict[int, float]] = {}
    for rec in records:
        step = rec.get("global_step")
        if not isinstance(step, int):
            continue
        if rec.get("type") == "train" and isinstance(rec.get("loss"), (int, float)):
            loss[step] = float(rec["loss"])
        for key, value in rec.items():
            if key.startswith("test_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                tests.setdefault(key[len("test_"):], {})[step] = float(value)
    return sorted(loss.items()), {k: sorted(v.items()) for k, v in tests.items()}


def speed_of(records: list[dict]) -> dict[str, float]:
    """Median of each `SPEED_KEYS` value over the training rows of log.txt (the median: the first window pays
    compilation and warm-up); mfu in %."""
    values: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("type") == "train":
            for key in SPEED_KEYS:
                if isinstance(rec.get(key), (int, float)) and not isinstance(rec[key], bool):
                    values.setdefault(key, []).append(float(rec[key]) * (100 if key == "mfu" else 1))
    return {k: statistics.median(v) for k, v in values.items()}


def load_experiment(exp_dir: str, ledger: list[dict]) -> dict:
    """{name, dir, args, summary, curve [(step, loss)], val_curves {metric: [(step, value)]}, status, commit} of one
    experiment folder."""
    name = os.path.basename(os.path.normpath(exp_dir))
    out = {"name": name, "dir": exp_dir, "args": {}, "summary": None, "curve": [], "val_curves": {},
           "speed": {}, "status": "missing", "commit": None}
    if not os.path.isdir(exp_dir):
        return out
    out["args"] = experiment.read_json(os.path.join(exp_dir, "args.json")) or {}
    out["summary"] = experiment.read_json(os.path.join(exp_dir, "summary.json"))
    out["commit"] = experiment.read_commit(exp_dir) or (out["summary"] or {}).get("commit")
    if os.path.exists(os.path.join(exp_dir, "log.txt")):
        records = experiment.read_jsonl(os.path.join(exp_dir, "log.txt"))
        out["curve"], out["val_curves"] = curves_of(records)
        out["speed"] = speed_of(records)
    out["status"] = status_of(exp_dir, out["summary"], ledger)
    return out


def status_of(exp_dir: str, summary: dict | None, ledger: list[dict]) -> str:
    """summary.json's `finished`/`evaluated` (its job may still be tearing down), else a live Slurm job's state
    (pending, running...: a stopped run requeued), else summary.json's status (stopped, failed), else the ledger
    job's failure (failed (cancelled)...), else `incomplete`."""
    if summary is not None and summary.get("status") in ("finished", "evaluated"):
        return summary["status"]
    ids = [j for e in ledger if os.path.normpath(e.get("exp_dir", "")) == os.path.normpath(exp_dir)
           for j in e.get("job_ids", [])]
    state = launch.job_states(ids[-1:]).get(ids[-1]) if ids else None
    if state in launch.LIVE_STATES:
        return state.lower()
    if summary is not None:
        status = summary.get("status")
        return status if status in experiment.STATUSES else "no status (old summary.json)"
    if os.path.exists(os.path.join(exp_dir, "summary.json")):
        return "unreadable summary.json"
    if any(f.startswith("nonfinite_") for f in os.listdir(exp_dir)):
        return "failed (non-finite loss)"
    if state in FAILED_STATES:
        return f"failed ({state.lower()})"
    return "incomplete"


def numeric_metrics(summary: dict | None) -> dict[str, float]:
    """The metric values of a summary (numbers that are not bookkeeping), NaN/Inf included."""
    return {k: float(v) for k, v in (summary or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING}


def val_name(exp: dict) -> str:
    """The validation set main.py resolved (summary), else what the flags say."""
    summary = exp["summary"] or {}
    return summary.get("val_dataset") or exp["args"].get("val_dataset") or exp["args"].get("dataset") or \
        summary.get("dataset", "?")


def metrics_of(exp: dict, wanted: list[str] | None) -> dict[str, float]:
    """Final metrics, named `<validation set>/<metric>`; default: zero-shot top-1 and mean recall. A wanted
    training-speed key (`SPEED_KEYS`) comes from log.txt, named `train/<key>`."""
    numeric = numeric_metrics(exp["summary"])
    keys = wanted or [k for k in numeric if k.startswith("acc1") or k == "mean_recall"] or sorted(numeric)
    out = {f"{val_name(exp)}/{k}": numeric[k] for k in keys if k in numeric}
    speed = exp.get("speed", {})
    return {**out, **{f"train/{k}": speed[k] for k in keys if k not in numeric and k in speed}}


# --------------------------------------------------------------------------- tables
def build_tables(root: str, repro: str | None, only: str | None, include_empty: bool = False) -> dict[str, dict]:
    """{table: {"rows": [row], "baseline": bool}}; a row is {label, expected [names], runs [experiments]}. Tables
    with no experiment folder at all are left out unless `include_empty`."""
    ledger = launch.read_ledger(root)
    tables: dict[str, dict] = {}

    def row(table: str, label: str) -> dict:
        rows = tables.setdefault(table, {"rows": {}, "baseline": False})["rows"]
        return rows.setdefault(label, {"label": label, "expected": [], "runs": []})

    if repro and os.path.exists(repro):
        for cmd in launch.read_repro(repro):
            base = launch.flag_value(cmd["argv"], "--name")
            if base is None:
                continue
            for _, suffix in launch.expand_sweep(cmd["argv"]):
                row(cmd["table"] or "untabled", row_key(base + suffix))["expected"].append(base + suffix)
            if cmd["table"]:
                tables[cmd["table"]]["baseline"] = True
    seen = set()
    for table in tables.values():
        for r in table["rows"].values():
            for name in r["expected"]:
                r["runs"].append(load_experiment(os.path.join(root, name), ledger))
                seen.add(name)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name in seen or not os.path.exists(os.path.join(root, name, "args.json")):
                continue
            exp = load_experiment(os.path.join(root, name), ledger)
            row(exp["args"].get("table") or "untabled", row_key(name))["runs"].append(exp)
    out = {}
    for table, t in tables.items():
        if only and table != only:
            continue
        rows = list(t["rows"].values())
        if not include_empty and not any(e["status"] != "missing" for r in rows for e in r["runs"]):
            continue
        out[table] = {"rows": rows, "baseline": t["baseline"] and table != "untabled"}
    return out


def check_metrics(tables: dict[str, dict], wanted: list[str]) -> None:
    """An unknown --metrics key fails, naming the keys the runs' summaries have and the closest one."""
    known = sorted({k for t in tables.values() for r in t["rows"] for e in r["runs"]
                    for k in [*numeric_metrics(e["summary"]), *e.get("speed", {})]})
    unknown = [k for k in wanted if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SystemExit(f"--metrics {','.join(unknown)}: not in any summary.json or log.txt of these runs; valid "
                         "keys: "
                         f"{', '.join(known) or '(none: no run has a summary)'}.{hint}")


def compute_metrics(tables: dict[str, dict], wanted: list[str] | None) -> None:
    """Set each row's metrics: {name: (mean, std, n, non-finite count)} over its finished runs (seeds); a NaN or
    Inf value is left out of the mean and counted (and warned about, naming the file and key)."""
    for t in tables.values():
        for r in t["rows"]:
            values: dict[str, list[float]] = {}
            bad: dict[str, int] = {}
            for exp in r["runs"]:
                if exp["status"] not in DONE:
                    continue
                for k, v in metrics_of(exp, wanted).items():
                    if math.isfinite(v):
                        values.setdefault(k, []).append(v)
                    else:
                        bad[k] = bad.get(k, 0) + 1
                        values.setdefault(k, [])
                        log.warning("%s: %s is %s (left out of the row's mean)",
                                    os.path.join(exp["dir"], "summary.json"), k.split("/", 1)[1], v)
            r["metrics"] = {k: (statistics.fmean(v) if v else math.nan,
                                statistics.stdev(v) if len(v) > 1 else 0.0, len(v), bad.get(k, 0))
                            for k, v in values.items()}


def row_args(r: dict) -> dict:
    """The flags of a row (those of its first run that has an args.json)."""
    return next((e["args"] for e in r["runs"] if e["args"]), {})


def differing_keys(base: dict, other: dict) -> list[str]:
    """The flags (args.json keys) whose values differ between two runs, seeds and bookkeeping flags left out."""
    if not base or not other:
        return []
    return [k for k in sorted((set(base) | set(other)) - PER_RUN_FLAGS) if base.get(k) != other.get(k)]


def flags_text(args: dict, keys: list[str]) -> str:
    """`--label-smoothing 0.1 --lr 0.002`: the values of `keys` in `args`."""
    return " ".join(f"--{k.replace('_', '-')} {_flag_value(args.get(k))}" for k in keys)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def legend_labels(table: dict) -> list[str]:
    """Per row, a name a reader understands: `baseline`, else what differs from the baseline (or, in a table
    without one, from its first row), else the row's name."""
    rows = table["rows"]
    ref = row_args(rows[0]) if rows else {}
    varying = sorted({k for r in rows[1:] for k in differing_keys(ref, row_args(r))})
    labels = []
    for i, r in enumerate(rows):
        if i == 0:
            own = flags_text(ref, varying) if varying and ref else ""
            labels.append(("baseline" + (f" ({own})" if own else "")) if table["baseline"] else (own or r["label"]))
            continue
        labels.append(flags_text(row_args(r), differing_keys(ref, row_args(r))) or r["label"])
    return labels


def table_cells(table: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, text cells, raw records) of one table; with a baseline, its first row is it."""
    rows = table["rows"]
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    base = rows[0]["metrics"] if rows and table["baseline"] else {}
    header = ["experiment", "runs", *metrics]
    cells, records = [], []
    for i, r in enumerate(rows):
        n_done = sum(e["status"] in DONE for e in r["runs"])
        n_all = max(len(r["runs"]), 1)
        other = sorted({e["status"] for e in r["runs"] if e["status"] not in DONE})
        runs = f"{n_done}/{n_all}" + (f" ({', '.join(other)})" if other else "")
        is_base = i == 0 and table["baseline"]
        line = [r["label"] + (" (baseline)" if is_base else ""), runs]
        record = {"experiment": r["label"], "baseline": is_base, "done": n_done, "runs": n_all,
                  "status": ",".join(other) or "done"}
        for k in metrics:
            line.append(metric_cell(r["metrics"].get(k), n_done, base.get(k) if not is_base else None, k, record))
        cells.append(line)
        records.append(record)
    return header, cells, records


def metric_cell(value: tuple | None, n_done: int, base: tuple | None, key: str, record: dict) -> str:
    """`71.20 ± 1.30 (+2.10)`; `missing` without runs; a mark when some values were NaN/Inf."""
    if value is None:
        return "missing" if n_done == 0 else "-"
    mean, std, n, bad = value
    text = "nan" if n == 0 else (f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}")
    record[key], record[f"{key} std"], record[f"{key} n"] = mean, std, n
    if base is not None and n and base[2]:
        delta = mean - base[0]
        text += f" ({delta:+.2f})"
        record[f"{key} delta"] = delta
    if bad:
        text += f" ({bad} non-finite)"
        record[f"{key} non-finite"] = bad
    return text


def render(tables: dict[str, dict], fmt: str) -> str:
    """The tables as Markdown, CSV or LaTeX."""
    out = io.StringIO()
    if fmt == "csv":
        records = [{"table": t, **rec} for t, table in tables.items() for rec in table_cells(table)[2]]
        keys = list(dict.fromkeys(k for rec in records for k in rec))
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue()
    for name, table in tables.items():
        header, cells, _ = table_cells(table)
        if fmt == "md":
            out.write(f"### {name}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            for line in cells:
                out.write("| " + " | ".join(line) + " |\n")
            out.write("\n")
        else:  # latex
            esc = lambda s: re.sub(r"([_%&#$])", r"\\\1", s).replace("±", r"$\pm$")  # noqa: E731
            out.write(f"% table: {name}\n\\begin{{tabular}}{{l" + "r" * (len(header) - 1) + "}\n\\toprule\n")
            out.write(" & ".join(esc(h) for h in header) + r" \\" + "\n\\midrule\n")
            for line in cells:
                out.write(" & ".join(esc(c) for c in line) + r" \\" + "\n")
            out.write("\\bottomrule\n\\end{tabular}\n\n")
    return out.getvalue()


# --------------------------------------------------------------------------- plots
def unit_of(metric: str) -> str:
    """` (%)` for accuracies and recalls (reported in percent), else ''."""
    return " (%)" if PERCENT_RE.match(metric.split("/", 1)[-1]) else ""


def band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) over runs at the steps every run has (finite values only)."""
    points = [{s: v for s, v in c if math.isfinite(v)} for c in curves if c]
    if not points:
        return [], [], []
    steps = sorted(set.intersection(*(set(p) for p in points)))
    means = [statistics.fmean(p[s] for p in points) for s in steps]
    stds = [statistics.stdev([p[s] for p in points]) if len(points) > 1 else 0.0 for s in steps]
    return steps, means, stds


def plot(tables: dict[str, dict], folder: str) -> list[str]:
    """Per table with a metric: `<table>_curves.png` (the first metric on the validation set vs optimizer step,
    mean ± std band over the seeds of each row) and `<table>_final.png` (the final metric per row, mean with std
    error bars over seeds, on an axis fitted to the values so that differences show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, table in tables.items():
        rows = table["rows"]
        metric = next((k for r in rows for k in r["metrics"]), None)
        if metric is None:
            log.warning("table %s: no finished run with a metric, no plot", name)
            continue
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        labels = legend_labels(table)
        paths.append(_curves_figure(plt, name, rows, labels, metric, os.path.join(folder, f"{safe}_curves.png")))
        paths.append(_final_figure(plt, name, rows, labels, metric, os.path.join(folder, f"{safe}_final.png")))
    return paths


def _curves_figure(plt, name: str, rows: list[dict], labels: list[str], metric: str, path: str) -> str:
    from matplotlib.ticker import MaxNLocator

    key = metric.split("/", 1)[1]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    last = max([s for r in rows for e in r["runs"] for s, _ in e["val_curves"].get(key, [])] or [1])
    for i, (r, label) in enumerate(zip(rows, labels)):
        runs = [e["val_curves"].get(key, []) for e in r["runs"] if e["status"] in DONE]
        steps, mean, std = band(runs)
        if not steps:
            continue
        dodge = (i - (len(rows) - 1) / 2) * 0.008 * last  # rows validated at the same steps stay apart
        steps = [x + dodge for x in steps]
        color = f"C{i % 10}"
        n = sum(bool(c) for c in runs)
        ax.plot(steps, mean, marker="o", markersize=4, color=color, label=f"{label} (n={n})")
        if n > 1:  # the band, and error bars so that a single validation shows its spread too
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, linewidth=0)
            ax.errorbar(steps, mean, yerr=std, fmt="none", ecolor=color, capsize=3, linewidth=1)
    ax.set_xlim(left=0, right=last * 1.06)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="optimizer step", ylabel=f"{metric}{unit_of(metric)}",
           title=f"{name}: {metric}{unit_of(metric)} during training\n(mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _final_figure(plt, name: str, rows: list[dict], labels: list[str], metric: str, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.6 * max(len(rows), 2)))
    ys = [len(rows) - 1 - i for i in range(len(rows))]  # first row (the baseline) on top
    for y, r in zip(ys, rows):
        value = r["metrics"].get(metric)
        if value is None or not value[2]:
            ax.annotate("no finished run", (0.5, y), xycoords=("axes fraction", "data"), ha="center", va="center",
                        fontsize=8, color="gray")
            continue
        mean, std, n, _ = value
        ax.errorbar([mean], [y], xerr=[std] if n > 1 else None, fmt="o", color="C0", capsize=4)
        key = metric.split("/", 1)[1]
        seeds = [v for e in r["runs"] if e["status"] in DONE for v in metrics_of(e, [key]).values() if math.isfinite(v)]
        ax.scatter(seeds, [y] * len(seeds), s=12, color="C0", alpha=0.35, zorder=1)
        ax.annotate(f"{mean:.2f}" + (f" ± {std:.2f} (n={n})" if n > 1 else " (n=1)"), (mean, y),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels[::-1], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.margins(x=0.25)  # fitted to the values, not from 0: differences between rows show
    ax.set(xlabel=f"{metric}{unit_of(metric)}",
           title=f"{name}: final {metric}{unit_of(metric)}\n(mean ± std over seeds; dots: single runs)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- --list, --diff, --wandb
def list_experiments(root: str) -> str:
    """Every experiment folder under `root`: status, step, headline metric and commit, as a Markdown table."""
    ledger = launch.read_ledger(root)
    lines = ["| experiment | status | step | metric | commit |", "|---|---|---|---|---|"]
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f))
                                              for f in ("args.json", "summary.json", "commit.txt")):
            continue
        exp = load_experiment(path, ledger)
        summary = exp["summary"] or {}
        step = f"{summary['step']}/{summary.get('total_steps', '?')}" if "step" in summary else "-"
        metric = experiment.headline_metric(summary)
        metric_text = f"{val_name(exp)}/{metric[0]} {metric[1]:.2f}" if metric else "-"
        lines.append(f"| {name} | {exp['status']} | {step} | {metric_text} | {(exp['commit'] or '-')[:12]} |")
    return "\n".join(lines) + "\n"


def resolve_experiment(root: str, name: str) -> str:
    """A folder given by path or by name under `root`; SystemExit naming both when neither has an args.json."""
    for path in (name, os.path.join(root, name)):
        if os.path.exists(os.path.join(path, "args.json")):
            return path
    raise SystemExit(f"--diff: no experiment {name!r} (no args.json in {name} or {os.path.join(root, name)})")


def diff_experiments(root: str, a: str, b: str) -> str:
    """The flags that differ between two experiments' args.json (those that make them different runs first, then
    the bookkeeping ones), and their commits when they differ."""
    dirs = [resolve_experiment(root, x) for x in (a, b)]
    args = [experiment.read_json(os.path.join(d, "args.json")) or {} for d in dirs]
    keys = sorted(set(args[0]) | set(args[1]))
    changed = [k for k in keys if args[0].get(k) != args[1].get(k)]
    lines = [f"--- {dirs[0]}", f"+++ {dirs[1]}"]
    for k in sorted(changed, key=lambda k: (k in experiment.RESUME_NEUTRAL_ARGS, k)):
        note = "  (does not change the run)" if k in experiment.RESUME_NEUTRAL_ARGS else ""
        lines.append(f"--{k.replace('_', '-')}: {args[0].get(k)!r} -> {args[1].get(k)!r}{note}")
    commits = [experiment.read_commit(d) for d in dirs]
    if commits[0] != commits[1]:
        lines.append(f"commit: {commits[0]} -> {commits[1]}")
    if len(lines) == 2:
        lines.append("same flags and commit")
    return "\n".join(lines) + "\n"


def add_wandb(tables: dict[str, dict], project: str, entity: str | None) -> None:
    """Fill in summaries of experiments that have none locally from wandb runs of the same name (display name)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    for table, t in tables.items():
        runs = {r.name: r for r in api.runs(path, filters={"group": table})}
        for r in t["rows"]:
            for exp in r["runs"]:
                if exp["summary"] is None and exp["name"] in runs:
                    summary = runs[exp["name"]].summary._json_dict  # main.py logs its status there too
                    exp["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
                    exp["args"] = {**dict(runs[exp["name"]].config), **exp["args"]}
                    status = summary.get("status")
                    exp["status"] = status if status in experiment.STATUSES else "no status (wandb)"


def main(argv: list[str] | None = None) -> str:
    """Print the tables (and write plots), the experiment list or a diff; returns the printed text."""
    p = argparse.ArgumentParser("CLIP Lab ablation report")
    p.add_argument("--root", default="experiments", help="experiments root (run.sh's --output-dir)")
    p.add_argument("--exps", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "repro_exps.txt"),
                   help="repro file whose '# table:' groups define the tables, expected runs and baselines")
    p.add_argument("--table", default=None, help="only this table")
    p.add_argument("--all", action="store_true", help="also tables none of whose runs exist (all marked missing)")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex"], help="output format")
    p.add_argument("--metrics", default=None,
                   help="comma list of summary.json keys (default acc1*, mean_recall), or training-speed keys of "
                        "log.txt (mfu in %%, tflops_per_s, samples_per_s: the median over the run); an unknown key "
                        "fails")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write <table>_curves.png (validation metric vs step) and <table>_final.png here")
    p.add_argument("--list", action="store_true", help="list every experiment under --root (status, step, metric, "
                                                       "commit) and exit")
    p.add_argument("--diff", nargs=2, metavar=("EXP_A", "EXP_B"),
                   help="print the flags that differ between two experiments (names under --root or paths) and exit")
    p.add_argument("--wandb", action="store_true", help="also read summaries of wandb runs (wandb.Api())")
    p.add_argument("--wandb-project", default="clip-lab", help="wandb project for --wandb")
    p.add_argument("--wandb-entity", default=None, help="wandb entity for --wandb")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list or args.diff:
        text = list_experiments(args.root) if args.list else diff_experiments(args.root, *args.diff)
        sys.stdout.write(text)
        return text
    tables = build_tables(args.root, args.exps, args.table, include_empty=args.all)
    if args.table and not tables:
        raise SystemExit(f"no table {args.table!r} with runs in {args.exps} or under {args.root} "
                         "(--all also shows tables without runs)")
    if args.wandb:
        add_wandb(tables, args.wandb_project, args.wandb_entity)
    wanted = args.metrics.split(",") if args.metrics else None
    if wanted:
        check_metrics(tables, wanted)
    compute_metrics(tables, wanted)
    text = render(tables, args.format)
    sys.stdout.write(text)
    if args.plot:
        for path in plot(tables, args.plot):
            log.info("wrote %s", path)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
