"""Launch main.py through submitit: `python run_with_submitit.py [main.py flags] [launcher flags]`.

The parser is main.get_args_parser() plus the launcher flags below (DINO/MAE/clip-rocket pattern). One Slurm
task per GPU (`--ngpus 8` = 8 tasks per node, each bound to cuda:LOCAL_RANK), or CPU tasks with `--ngpus 0`
(gloo). The trainer is Checkpointable: on preemption or timeout (USR2 from Slurm) `checkpoint()` resubmits the
same flags and Slurm requeues the job under the same job id; the restarted job resolves the experiment
folder's latest `checkpoint.pt` at start-up (main.py's auto-resume), never a path pickled at submit time.
Progress since the last checkpoint is lost on requeue, so long runs should pass `--save-every-steps N`.
`run.sh` (one commit -> one experiment) calls `launch()` through launch.py; this file also runs on its own.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import submitit

import main

log = logging.getLogger("clip_lab.launch")

SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: room to finish a step and exit
MAX_NUM_TIMEOUT = 30  # requeues on timeout (preemptions are requeued without limit)


def launcher_parser() -> argparse.ArgumentParser:
    """The launcher-only flags (no main.py flags), `add_help=False` so it can be a parent."""
    p = argparse.ArgumentParser("CLIP Lab launcher flags", add_help=False)
    g = p.add_argument_group("launcher (run_with_submitit.py)")
    g.add_argument("--nodes", type=int, default=1, help="Slurm nodes")
    g.add_argument("--ngpus", type=int, default=8,
                   help="GPUs per node, one task per GPU; 0 runs CPU tasks (gloo), as in CI")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node; default --ngpus (one per GPU), or 1 with --ngpus 0")
    g.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loader workers + 1)")
    g.add_argument("--mem-gb", type=float, default=None,
                   help="memory per node in GB; default 40 per GPU, or 4 per task with --ngpus 0")
    g.add_argument("--timeout", type=int, default=2800,
                   help="time limit in minutes; the job is requeued on timeout (up to 30 times)")
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    g.add_argument("--constraint", default=None, help="Slurm --constraint (node features)")
    g.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (--constraint volta32gb)")
    g.add_argument("--account", default=None, help="Slurm account")
    g.add_argument("--qos", default=None, help="Slurm QOS")
    g.add_argument("--comment", default=None, help="Slurm job comment")
    g.add_argument("--job-dir", default=None,
                   help="submitit folder for pickles and logs (%%j = job id); default <experiment>/submitit/%%j, "
                        "<output-dir>/submitit/%%j for a job array")
    g.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="executor; default slurm when sbatch exists, else local")
    g.add_argument("--array-parallelism", type=int, default=256, help="at most this many array jobs at once")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags + the launcher flags (the parser repro_exps.txt lines are checked with)."""
    return argparse.ArgumentParser("CLIP Lab submitit launcher", parents=[main.get_args_parser(), launcher_parser()])


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, main.py argv) from one command line; main flags are validated by main.parse_args."""
    get_args_parser().parse_args(argv)  # unknown flags and bad values fail here, with the full usage
    launcher, rest = launcher_parser().parse_known_args(argv)
    return launcher, rest


# --------------------------------------------------------------------------- the job
class Trainer(submitit.helpers.Checkpointable):
    """The submitted callable: runs main.main(argv) on every task; `checkpoint()` requeues it unchanged."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        # sbatch copies the submitter's environment: a WANDB_SERVICE inherited from a process that had called
        # wandb.init would make every job (and every requeued attempt) share that one wandb-core service, where the
        # killed attempt's stream keeps the run id "in use". Each job starts its own service.
        os.environ.pop("WANDB_SERVICE", None)
        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for env:// init (same port after a requeue: same job
        # id). CUDA_VISIBLE_DEVICES is left alone: main binds each task to cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        args = main.parse_args(self.argv)
        exp_dir = main.experiment_dir(args)
        latest = os.path.join(exp_dir, "checkpoint.pt")
        if os.path.exists(latest) and args.resume:  # a requeue continues from the latest, not from --resume
            args.resume = None
        if env.global_rank == 0:
            os.makedirs(exp_dir, exist_ok=True)
            record_event(exp_dir, "start", job_id=env.job_id, tasks=env.num_tasks, nodes=env.num_nodes,
                         resume_from=latest if os.path.exists(latest) else args.resume)
        import torch.distributed as dist

        try:
            summary = main.main(args)
        finally:
            if dist.is_available() and dist.is_initialized():  # every rank, also after an error (submitit#1643)
                dist.destroy_process_group()
        if env.global_rank == 0:
            record_event(exp_dir, "end", job_id=env.job_id, step=summary.get("step"))
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 in the USR2 handler: requeue the same flags (resume is resolved later)."""
        log.warning("preempted or timed out: requeueing %s", " ".join(self.argv[:4]))
        return submitit.helpers.DelayedSubmission(Trainer(self.argv))


def record_event(exp_dir: str, event: str, **fields) -> None:
    """Append a launcher event (start/end of a job attempt) to <experiment>/launch_events.jsonl."""
    with open(os.path.join(exp_dir, "launch_events.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


# --------------------------------------------------------------------------- submission
def executor_parameters(la: argparse.Namespace, name: str) -> dict:
    """AutoExecutor.update_parameters() keywords for the launcher flags (slurm_* apply on Slurm only)."""
    tasks = la.tasks_per_node or (la.ngpus if la.ngpus > 0 else 1)
    mem_gb = la.mem_gb if la.mem_gb is not None else (40 * la.ngpus if la.ngpus > 0 else 4 * tasks)
    params = {"nodes": la.nodes, "tasks_per_node": tasks, "cpus_per_task": la.cpus_per_task, "mem_gb": mem_gb,
              "timeout_min": la.timeout, "name": name, "slurm_signal_delay_s": min(SIGNAL_DELAY_S, la.timeout * 30),
              "slurm_array_parallelism": la.array_parallelism,
              # one rank failing (an exception, too many bad samples, OOM) ends the step at once: its peers
              # would otherwise wait in their next collective until the process-group timeout
              "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    if la.ngpus > 0:
        params["gpus_per_node"] = la.ngpus
    constraint = "volta32gb" if la.use_volta32 else la.constraint
    for key, value in (("slurm_partition", la.partition), ("slurm_constraint", constraint),
                       ("slurm_account", la.account), ("slurm_qos", la.qos), ("slurm_comment", la.comment)):
        if value:
            params[key] = value
    return params


def make_executor(la: argparse.Namespace, folder: str, name: str) -> submitit.AutoExecutor:
    cluster = la.cluster or (None if submitit.AutoExecutor.which() == "slurm" else "local")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    params = executor_parameters(la, name)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    return executor


def sbatch_text(la: argparse.Namespace, folder: str, name: str, python: str = sys.executable,
                array_size: int | None = None) -> str:
    """The sbatch script Slurm would get for these flags, made without submitting (for --dry-run and the golden
    test); the same translation as submitit's AutoExecutor -> SlurmExecutor."""
    from submitit.slurm import slurm

    rename = submitit.SlurmExecutor._equivalence_dict()
    params = {}
    for key, value in executor_parameters(la, name).items():
        key = key.removeprefix("slurm_") if key.startswith("slurm_") else rename[key]
        params[key] = slurm._convert_mem(value) if key == "mem" else value
    command = f"{python} -u -m submitit.core._submit {folder}"
    if array_size and array_size > 1:
        params["map_count"] = array_size
    return slurm._make_sbatch_string(command=command, folder=folder, **params)


def prepare(argv: list[str]) -> dict:
    """Parse one experiment's command line into {name, exp_dir, argv (main.py), launcher} with absolute paths."""
    la, main_argv = split_argv(argv)
    args = main.parse_args(main_argv)
    if not os.path.isabs(args.output_dir):
        main_argv = main_argv + ["--output-dir", os.path.abspath(args.output_dir)]
        args = main.parse_args(main_argv)
    exp_dir = main.experiment_dir(args)
    return {"name": os.path.basename(exp_dir), "exp_dir": exp_dir, "argv": main_argv, "launcher": la, "args": args}


def launch(argvs: list[list[str]], dry_run: bool = False) -> list[dict]:
    """Submit one job per command line (several = one Slurm job array); returns [{name, exp_dir, job_id, ...}].

    Launcher flags must be the same for all lines of an array. Raises SystemExit with Slurm's message when the
    submission fails, and when an experiment folder belongs to a run with other flags.
    """
    exps = [prepare(argv) for argv in argvs]
    la = exps[0]["launcher"]
    if any(vars(e["launcher"]) != vars(la) for e in exps):
        raise SystemExit("a job array needs the same launcher flags on every line (sweep only main.py flags)")
    for e in exps:
        main.check_folder_owner(e["exp_dir"], e["args"])
    root = os.path.dirname(exps[0]["exp_dir"])
    default_dir = os.path.join(exps[0]["exp_dir"] if len(exps) == 1 else root, "submitit", "%j")
    folder = os.path.abspath(la.job_dir or default_dir)
    prefix = os.path.commonprefix([e["name"] for e in exps]).rstrip("_-")
    name = exps[0]["name"] if len(exps) == 1 else prefix or "sweep"
    if dry_run:
        for e in exps:
            log.info("experiment %s\n  folder: %s\n  main.py %s", e["name"], e["exp_dir"], " ".join(e["argv"]))
        log.info("sbatch parameters: %s", json.dumps(executor_parameters(la, name), sort_keys=True))
        log.info("sbatch script:\n%s", sbatch_text(la, folder, name, array_size=len(exps)))
        return [{"name": e["name"], "exp_dir": e["exp_dir"], "job_id": None} for e in exps]
    executor = make_executor(la, folder, name)
    try:
        if len(exps) == 1:
            jobs = [executor.submit(Trainer(exps[0]["argv"]))]
        else:
            with executor.batch():
                jobs = [executor.submit(Trainer(e["argv"])) for e in exps]
    except Exception as exc:  # submitit wraps sbatch's stderr in FailedJobError / CalledProcessError
        raise SystemExit(f"submission failed: {exc}") from exc
    out = []
    for e, job in zip(exps, jobs):
        os.makedirs(e["exp_dir"], exist_ok=True)
        info = {"name": e["name"], "exp_dir": e["exp_dir"], "job_id": str(job.job_id), "cluster": executor.cluster,
                "submitit_folder": str(job.paths.folder), "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr), "time": time.time()}
        with open(os.path.join(e["exp_dir"], "jobs.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
        log.info("submitted job %s (%s)\n  experiment: %s\n  stdout: %s\n  stderr: %s", info["job_id"],
                 executor.cluster, e["exp_dir"], info["stdout"], info["stderr"])
        out.append({**info, "job": job})
    return out


def main_cli(argv: list[str] | None = None) -> list[dict]:
    """`python run_with_submitit.py ...`: submit one experiment; `--help` lists main.py and launcher flags."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return launch([argv])


if __name__ == "__main__":
    main_cli()
