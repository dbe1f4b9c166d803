"""Submit training to SLURM.

    python -m launch.slurm submit CONFIG [key=value ...] --nodes N --gpus-per-node G --time T
        [--procs-per-node P] [--partition P] [--account A] [--job-name NAME]
        [--signal-lead SECONDS] [--log-dir DIR] [--dry-run]

Builds an `sbatch` argv around `train.sbatch` (one torchrun per node, SIGUSR2 `--signal-lead`
seconds before the time limit, requeue on preemption) and prints the job id.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).with_name("train.sbatch")


def build_submit_parser() -> argparse.ArgumentParser:
    submit = argparse.ArgumentParser(
        prog="python -m launch.slurm submit", description="Submit a training run with sbatch."
    )
    submit.add_argument("config", help="training config YAML")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus-per-node", type=int, required=True, help="0 on a CPU partition")
    submit.add_argument(
        "--procs-per-node", type=int, help="torchrun processes per node (default: gpus per node, else 1)"
    )
    submit.add_argument("--time", required=True, help="time limit in any sbatch format, e.g. 2-00:00:00")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--job-name", help="default: the config file's stem")
    submit.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="seconds before the time limit to send SIGUSR2 (SLURM may send it up to 60s earlier); "
        "must cover finishing a step plus saving a checkpoint",
    )
    submit.add_argument("--log-dir", type=Path, default=Path("slurm-logs"), help="per-job logs go here")
    submit.add_argument(
        "--dry-run", action="store_true", help="print the sbatch command instead of running it"
    )
    # Advanced: the Python module torchrun runs; tests point it at a stand-in worker.
    submit.add_argument("--module", default="launch.train", help=argparse.SUPPRESS)
    return submit


def sbatch_argv(args: argparse.Namespace) -> list[str]:
    """The full sbatch command line for a parsed `submit`; user text only ever becomes argv items."""
    procs = args.procs_per_node or max(args.gpus_per_node, 1)
    argv = ["sbatch", "--parsable", f"--nodes={args.nodes}", f"--time={args.time}"]
    if args.gpus_per_node > 0:
        argv.append(f"--gpus-per-node={args.gpus_per_node}")
    argv += [f"--signal=USR2@{args.signal_lead}", f"--job-name={args.job_name or Path(args.config).stem}"]
    array = getattr(args, "array", None)
    if array:  # a job array (benchmarks.sweep): one log per task, %A the array's id, %a the index
        argv += [f"--array={array}", f"--output={args.log_dir.resolve() / '%x-%A_%a.log'}"]
    else:
        argv.append(f"--output={args.log_dir.resolve() / '%x-%j.log'}")
    if args.partition:
        argv.append(f"--partition={args.partition}")
    if args.account:
        argv.append(f"--account={args.account}")
    argv += [str(SBATCH_SCRIPT), str(procs), args.module]
    program_args = getattr(args, "program_args", None)
    if program_args:  # another entry point's own argv (benchmarks.sweep's array task)
        return argv + list(program_args)
    # The config path is resolved now: the job may start in another working directory after requeue.
    return argv + ["--config", str(Path(args.config).resolve()), *args.overrides]


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    bad = [item for item in args.overrides if "=" not in item or item.startswith("=")]
    if bad:
        parser.error(f"overrides must look like key=value: {' '.join(bad)}")
    if not Path(args.config).is_file():
        parser.error(f"config not found: {args.config}")
    if (
        args.nodes < 1
        or args.gpus_per_node < 0
        or (args.procs_per_node is not None and args.procs_per_node < 1)
    ):
        parser.error("--nodes and --procs-per-node must be >= 1, --gpus-per-node >= 0")
    if args.module == "launch.train" and not getattr(args, "program_args", None):
        # the config as the job will load it, now: an unset ??? path or a bad key is an error here, not
        # a job that waits in the queue for hours to fail at start-up
        from launch.config import load_config

        try:
            load_config(args.config, args.overrides)
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"config error: {e}")


def submit(args: argparse.Namespace) -> int:
    argv = sbatch_argv(args)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    # sbatch does not create the directory of --output; a missing one makes the job fail silently.
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        return result.returncode
    # --parsable prints "jobid" or "jobid;cluster".
    print(result.stdout.strip().split(";")[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["submit"]:
        sys.stderr.write(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    parser = build_submit_parser()
    # Intermixed, so overrides may come before or after the options (argparse can't do that with
    # subparsers, hence the hand-rolled command dispatch above).
    args = parser.parse_intermixed_args(argv[1:])
    _check(parser, args)
    return submit(args)


if __name__ == "__main__":
    sys.exit(main())
