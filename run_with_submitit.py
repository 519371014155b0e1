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
import subprocess
import sys
import time

import submitit

import experiment
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


# launcher flags whose values reach the sbatch script (or, --job-dir, file names)
SCRIPT_FLAGS = ("comment", "partition", "constraint", "account", "qos", "job_dir")


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, main.py argv) from one command line; main flags are validated by main.parse_args.
    A control character in a value that reaches the sbatch script fails here, naming the flag."""
    get_args_parser().parse_args(argv)  # unknown flags and bad values fail here, with the full usage
    launcher, rest = launcher_parser().parse_known_args(argv)
    for dest in SCRIPT_FLAGS:
        error = experiment.control_character_error("--" + dest.replace("_", "-"), getattr(launcher, dest))
        if error:
            raise SystemExit(error)
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
        if env.global_rank == 0:
            os.makedirs(exp_dir, exist_ok=True)
            record_event(exp_dir, "start", job_id=env.job_id, tasks=env.num_tasks, nodes=env.num_nodes,
                         resume_from=main.resume_source(exp_dir, args))
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
        """Called by submitit on rank 0 in the USR2 handler: requeue the same flags (resume is resolved later). The
        run's summary then says `stopped` (experiment.PREEMPTED), not `failed`, when submitit exits the process."""
        experiment.PREEMPTED.set()
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


def cluster_of(la: argparse.Namespace) -> str:
    """--cluster, else slurm where sbatch exists, else local."""
    return la.cluster or ("slurm" if submitit.AutoExecutor.which() == "slurm" else "local")


def make_executor(la: argparse.Namespace, folder: str, name: str) -> submitit.Executor:
    """The executor of `cluster_of(la)`: on Slurm `slurm_executor` (the one --dry-run prints the script of)."""
    if cluster_of(la) == "slurm":
        return slurm_executor(la, folder, name)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster_of(la))
    executor.update_parameters(**{k: v for k, v in executor_parameters(la, name).items() if not k.startswith("slurm_")})
    return executor


class ScriptWriter(submitit.SlurmExecutor):
    """submitit's Slurm executor on a machine without Slurm, used only to write sbatch scripts (--dry-run)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def slurm_executor(la: argparse.Namespace, folder: str, name: str, executor_class=submitit.SlurmExecutor,
                   python: str | None = None) -> submitit.SlurmExecutor:
    """A SlurmExecutor with the launcher flags, translated as submitit's AutoExecutor does (generic keywords through
    `_convert_parameters`, `slurm_*` ones unprefixed); `python`: the job's interpreter (default this one)."""
    executor = executor_class(folder, max_num_timeout=MAX_NUM_TIMEOUT, python=python)
    params = executor_parameters(la, name)
    converted = executor._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    converted.update({k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")})
    executor.update_parameters(**converted)
    return executor


def sbatch_text(la: argparse.Namespace, folder: str, name: str, python: str | None = None,
                array_size: int | None = None) -> str:
    """The sbatch script a submission of these flags writes, made without submitting (for --dry-run and the golden
    test) by submitit's own code: the executor of a real submission, its command and its script text."""
    executor = slurm_executor(la, folder, name, ScriptWriter, python)
    if array_size and array_size > 1:  # as SlurmExecutor._internal_process_submissions does for a job array
        executor.parameters["map_count"] = array_size
    return executor._make_submission_file_text(executor._submitit_command_str, uid="")


def name_array_tasks(jobs: list, names: list[str]) -> None:
    """Give each task of a job array its experiment's name (`scontrol update`; the array's script names only the
    first), so `squeue`/`sacct` show what runs. A failure only warns: the jobs run anyway."""
    for job, name in zip(jobs[1:], names[1:]):
        try:
            subprocess.run(["scontrol", "update", f"JobId={job.job_id}", f"JobName={name}"], check=True,
                           capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not name job %s %r: %s", job.job_id, name, getattr(exc, "stderr", None) or exc)


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

    Launcher flags must be the same for all lines of an array. Each job (each task of an array) is named after its
    experiment. Finished experiments are skipped (logged). Raises SystemExit with Slurm's message when the
    submission fails, and when an experiment folder belongs to a run with other flags or is in use.
    """
    exps = [prepare(argv) for argv in argvs]
    la = exps[0]["launcher"]
    if any(vars(e["launcher"]) != vars(la) for e in exps):
        raise SystemExit("a job array needs the same launcher flags on every line (sweep only main.py flags)")
    for e in exps:
        main.check_folder_free(e["exp_dir"], e["args"])
    for e in [e for e in exps if experiment.finished_summary(e["exp_dir"]) is not None]:
        log.info("already finished, not submitted: %s", e["exp_dir"])
        exps.remove(e)
    if not exps:
        return []
    root = os.path.dirname(exps[0]["exp_dir"])
    default_dir = os.path.join(exps[0]["exp_dir"] if len(exps) == 1 else root, "submitit", "%j")
    folder = os.path.abspath(la.job_dir or default_dir)
    name = exps[0]["name"]  # a job array's script names its first task; name_array_tasks renames the others
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
    cluster = cluster_of(la)
    if cluster == "slurm" and len(jobs) > 1:
        name_array_tasks(jobs, [e["name"] for e in exps])
    out = []
    for e, job in zip(exps, jobs):
        os.makedirs(e["exp_dir"], exist_ok=True)
        info = {"name": e["name"], "exp_dir": e["exp_dir"], "job_id": str(job.job_id), "cluster": cluster,
                "submitit_folder": str(job.paths.folder), "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr), "time": time.time()}
        with open(os.path.join(e["exp_dir"], "jobs.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
        log.info("submitted job %s (%s)\n  experiment: %s\n  stdout: %s\n  stderr: %s", info["job_id"],
                 cluster, e["exp_dir"], info["stdout"], info["stderr"])
        out.append({**info, "job": job})
    return out


def main_cli(argv: list[str] | None = None) -> list[dict]:
    """`python run_with_submitit.py ...`: submit one experiment; `--help` lists main.py and launcher flags."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return launch([argv])


if __name__ == "__main__":
    main_cli()
