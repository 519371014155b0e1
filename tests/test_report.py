"""report.py on experiment folders as main.py writes them (args.json from the real parser, summary.json, log.txt),
including damaged ones: torn lines, unreadable files, NaN/Inf metrics; status, baselines, --metrics, plots, --list,
--diff. (An end-to-end report of real runs: tests/test_launch.py and tests/test_lifecycle.py.)"""
from __future__ import annotations

import json
import logging
import math
import os

import matplotlib
import pytest

import main
import report

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

BASE = ["--model", "CLIP_VITT16_CLIP", "--dataset", "digits", "--image-size", "32", "--transformer-layers", "1"]


def make_exp(root, name: str, flags: list[str], summary: dict | None = None, curve: dict | None = None,
             status: str = "finished") -> str:
    """A folder like main.py leaves: args.json of the real parser, summary.json, log.txt with validations."""
    exp = root / name
    exp.mkdir(parents=True)
    args = main.parse_args(BASE + flags + ["--name", name, "--output-dir", str(root)])
    (exp / "args.json").write_text(json.dumps(main.args_dict(args), indent=1))
    (exp / "commit.txt").write_text("abc123\n")
    records = [{"type": "train", "epoch": 0, "global_step": s, "loss": 2.0 - s / 10} for s in (1, 2, 3, 4)]
    records += [{"type": "epoch", "epoch": i + 1, "global_step": step, "test_acc1_z": v}
                for i, (step, v) in enumerate(sorted((curve or {}).items()))]
    (exp / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        full = {"status": status, "reason": None, "model": "CLIP_VITT16_CLIP", "dataset": "digits",
                "val_dataset": "digits", "epoch": 1, "step": 4, "total_steps": 4, "best_metric": 0.0,
                "metrics_step": 4, "train_time_s": 1.0, "commit": "abc123", **summary}
        (exp / "summary.json").write_text(json.dumps(full, indent=1))
    return str(exp)


def repro(tmp_path, text: str) -> str:
    path = tmp_path / "repro.txt"
    path.write_text(text)
    return str(path)


LS_REPRO = "# table: ls\nbash run.sh run_with_submitit.py --table ls --name LS --label-smoothing 0.0,0.1 --seed 0,1\n"


def ls_table(root):
    """ls: baseline 50 ± 1.41 (curves 30 -> 50), --label-smoothing 0.1: 53 ± 1.41."""
    for ls, offset in (("0.0", 0.0), ("0.1", 3.0)):
        for seed, noise in ((0, -1.0), (1, 1.0)):
            final = 50 + offset + noise
            make_exp(root, f"LS_label-smoothing{ls}_seed{seed}",
                     ["--table", "ls", "--label-smoothing", ls, "--seed", str(seed)],
                     {"acc1_z": final, "mean_recall": 20.0 + offset}, curve={2: final - 20, 4: final})


# --------------------------------------------------------------------------- robustness
def test_torn_lines_unreadable_files_and_nonfinite_metrics_are_warned_and_marked(tmp_path, caplog):
    """Today one torn log.txt line, summary.json or ledger line made report.py crash with a JSONDecodeError, and a
    NaN seed turned the row's mean into nan without a word."""
    root = tmp_path / "exps"
    ok = make_exp(root, "R_seed0", ["--table", "t"], {"acc1_z": 60.0}, curve={4: 60.0})
    make_exp(root, "R_seed1", ["--table", "t", "--seed", "1"], {"acc1_z": 62.0})
    make_exp(root, "R_seed2", ["--table", "t", "--seed", "2"], {"acc1_z": math.nan})
    make_exp(root, "R_seed3", ["--table", "t", "--seed", "3"], {"acc1_z": math.inf})
    with open(os.path.join(ok, "log.txt"), "a", encoding="utf-8") as f:
        f.write("\n" + '{"type": "train", "global_st')  # a blank line and a torn last line (killed writer)
    torn = make_exp(root, "R_seed4", ["--table", "t", "--seed", "4"], {"acc1_z": 61.0})
    with open(os.path.join(torn, "summary.json"), "w", encoding="utf-8") as f:
        f.write('{"status": "fini')
    bad_args = make_exp(root, "Q", ["--table", "t"], {"acc1_z": 1.0})
    with open(os.path.join(bad_args, "args.json"), "w", encoding="utf-8") as f:
        f.write("")
    (root / "ledger.jsonl").write_text(json.dumps({"name": "R_seed0", "exp_dir": ok, "job_ids": []}) + "\n{\"na\n")
    with caplog.at_level(logging.WARNING):
        md = report.main(["--root", str(root), "--exps", str(tmp_path / "none")])
    log_txt = os.path.join(ok, "log.txt")
    for needle in (f"{log_txt}:6: torn or blank line skipped", f"{log_txt}:7: torn or blank line skipped",
                   f"{root / 'ledger.jsonl'}:2: torn or blank ledger line skipped",
                   f"{os.path.join(torn, 'summary.json')}: unreadable", f"{os.path.join(bad_args, 'args.json')}",
                   f"{os.path.join(str(root), 'R_seed2', 'summary.json')}: acc1_z is nan",
                   f"{os.path.join(str(root), 'R_seed3', 'summary.json')}: acc1_z is inf"):
        assert needle in caplog.text, needle
    row = next(line for line in md.splitlines() if line.startswith("| R |"))
    assert "4/5 (unreadable summary.json)" in row and "61.00 ± 1.41 (2 non-finite)" in row
    assert report.build_tables(str(root), None, None)["t"]["rows"][0]["runs"][0]["val_curves"] == \
        {"acc1_z": [(4, 60.0)]}


def test_stopped_failed_and_running_runs_are_shown_as_such_never_as_done(tmp_path):
    root = tmp_path / "exps"
    make_exp(root, "S_seed0", ["--table", "t"], {"acc1_z": 10.0}, status="stopped")
    make_exp(root, "S_seed1", ["--table", "t", "--seed", "1"], {"acc1_z": 20.0}, status="failed")
    make_exp(root, "S_seed2", ["--table", "t", "--seed", "2"], {"acc1_z": 30.0})
    make_exp(root, "S_seed3", ["--table", "t", "--seed", "3"])  # started, no summary yet
    md = report.main(["--root", str(root), "--exps", str(tmp_path / "none")])
    row = next(line for line in md.splitlines() if line.startswith("| S |"))
    assert "| 1/4 (failed, incomplete, stopped) | 30.00 |" in row  # only the finished run is averaged


def test_a_finished_run_whose_job_still_tears_down_is_finished_and_a_requeued_stop_is_running(tmp_path,
                                                                                               monkeypatch):
    """Slurm still says RUNNING while a finished run's process exits (the lab-loop test on real Slurm hit it): its
    summary decides. A stopped run whose job is live again was requeued: running."""
    done = make_exp(tmp_path, "F", [], {"acc1_z": 1.0})
    stopped = make_exp(tmp_path, "S", [], {"acc1_z": 1.0}, status="stopped")
    ledger = [{"exp_dir": done, "job_ids": ["7"]}, {"exp_dir": stopped, "job_ids": ["8"]}]
    monkeypatch.setattr(report.launch, "job_states", lambda ids: {i: "RUNNING" for i in ids})
    assert report.status_of(done, json.load(open(os.path.join(done, "summary.json"))), ledger) == "finished"
    assert report.status_of(stopped, json.load(open(os.path.join(stopped, "summary.json"))), ledger) == "running"


# --------------------------------------------------------------------------- defaults
def test_only_tables_with_runs_baseline_from_the_repro_file_and_unknown_metric_keys(tmp_path):
    root = tmp_path / "exps"
    ls_table(root)
    make_exp(root, "loose", [], {"acc1_z": 40.0})  # no --table: never anyone's baseline
    exps = repro(tmp_path, LS_REPRO + "# table: empty\nbash run.sh main.py --table empty --name NEVER-RUN\n")
    md = report.main(["--root", str(root), "--exps", exps])
    assert "### ls" in md and "### empty" not in md and "### untabled" in md
    lines = md.splitlines()
    assert any(x.startswith("| LS_label-smoothing0.0 (baseline) | 2/2 | 50.00 ± 1.41 |") for x in lines)
    assert any(x.startswith("| LS_label-smoothing0.1 | 2/2 | 53.00 ± 1.41 (+3.00) |") for x in lines)
    assert "| loose | 1/1 | 40.00 |" in md and "loose (baseline)" not in md
    everything = report.main(["--root", str(root), "--exps", exps, "--all"])
    assert "### empty" in everything and "| NEVER-RUN (baseline) | 0/1 (missing) |" in everything
    with pytest.raises(SystemExit, match=r"--metrics acc1: not in any summary.json.*valid keys: acc1_z, "
                                         r"mean_recall\. Did you mean 'acc1_z'\?"):
        report.main(["--root", str(root), "--exps", exps, "--metrics", "acc1"])
    assert "20.00" in report.main(["--root", str(root), "--exps", exps, "--metrics", "mean_recall"])


def test_metrics_mfu_tabulates_each_runs_median_training_speed_from_log_txt(tmp_path):
    """--metrics acc1_z,mfu,tflops_per_s: the summary's accuracy beside the median of log.txt's progress rows (the
    first window, which pays compilation, does not drag it down); mfu in %."""
    root = tmp_path / "exps"
    for name, mfus in (("eager", [0.1, 0.2, 0.22, 0.24]), ("compiled", [0.01, 0.3, 0.32, 0.34])):
        exp = make_exp(root, name, ["--table", "speed"] + (["--compile"] if name == "compiled" else []),
                       {"acc1_z": 40.0})
        rows = [{"type": "train", "epoch": 0, "global_step": s, "loss": 1.0, "mfu": m, "tflops_per_s": 50 * m,
                 "samples_per_s": 10.0} for s, m in enumerate(mfus, 1)]
        with open(os.path.join(exp, "log.txt"), "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    md = report.main(["--root", str(root), "--exps", repro(tmp_path, ""), "--metrics", "acc1_z,mfu,tflops_per_s"])
    assert "| experiment | runs | digits/acc1_z | train/mfu | train/tflops_per_s |" in md
    assert "| eager | 1/1 | 40.00 | 21.00 | 10.50 |" in md and "| compiled | 1/1 | 40.00 | 31.00 | 15.50 |" in md


# --------------------------------------------------------------------------- plots
def test_plots_show_validation_curves_and_final_points_a_reader_can_read(tmp_path, monkeypatch):
    """Per table: the validation metric vs step with a mean ± std band over seeds, and the final metric per row as
    points with std error bars on an axis fitted to the values; titles name table, metric and unit; legends name
    rows by what differs from the baseline."""
    root = tmp_path / "exps"
    ls_table(root)
    figures = {}
    savefig = Figure.savefig

    def spy(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        legend = ax.get_legend()
        figures[os.path.basename(path)] = {
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "xlim": ax.get_xlim(),
            "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
            "yticks": [t.get_text() for t in ax.get_yticklabels()], "bands": len(ax.collections)}
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    report.main(["--root", str(root), "--exps", repro(tmp_path, LS_REPRO), "--plot", str(tmp_path / "plots")])
    assert sorted(figures) == ["ls_curves.png", "ls_final.png"]
    curves, final = figures["ls_curves.png"], figures["ls_final.png"]
    assert curves["title"].startswith("ls: digits/acc1_z (%)") and "mean ± std over seeds" in curves["title"]
    assert curves["xlabel"] == "optimizer step" and curves["ylabel"] == "digits/acc1_z (%)"
    assert curves["legend"] == ["baseline (--label-smoothing 0.0) (n=2)", "--label-smoothing 0.1 (n=2)"]
    assert curves["bands"] >= 2
    assert final["title"].startswith("ls: final digits/acc1_z (%)")
    assert final["yticks"] == ["--label-smoothing 0.1", "baseline (--label-smoothing 0.0)"]  # baseline on top
    low, high = final["xlim"]
    assert 40 < low < 49 and 54 < high < 65  # fitted to 49-54, not stretched from 0
    for png in ("ls_curves.png", "ls_final.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- --list, --diff
def test_list_and_diff(tmp_path):
    root = tmp_path / "exps"
    ls_table(root)
    make_exp(root, "half", ["--max-steps", "2"], {"acc1_z": 12.5, "step": 2}, status="stopped")
    listing = report.main(["--root", str(root), "--list"])
    assert "| LS_label-smoothing0.1_seed1 | finished | 4/4 | digits/acc1_z 54.00 | abc123 |" in listing
    assert "| half | stopped | 2/4 | digits/acc1_z 12.50 | abc123 |" in listing
    diff = report.main(["--root", str(root), "--diff", "LS_label-smoothing0.0_seed0",
                        str(root / "LS_label-smoothing0.1_seed1")])
    lines = diff.splitlines()
    assert lines[2:] == ["--label-smoothing: 0.0 -> 0.1", "--seed: 0 -> 1",
                         "--name: 'LS_label-smoothing0.0_seed0' -> 'LS_label-smoothing0.1_seed1'  "
                         "(does not change the run)"]
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        report.main(["--root", str(root), "--diff", "nope", "half"])
