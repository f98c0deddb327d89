"""``python -m sb3_ppo_ext.benchmark``: multi-seed comparisons and ablations, RL Zoo style."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from sb3_ppo_ext import distributed
from sb3_ppo_ext.benchmark import plots, statistics
from sb3_ppo_ext.benchmark.ablations import ABLATIONS
from sb3_ppo_ext.benchmark.runner import execute, plan, zoo_budget
from sb3_ppo_ext.benchmark.runs import ALGOS, NAMED_ONLY_ALGOS

EPILOG = """examples:
  python -m sb3_ppo_ext.benchmark --envs CartPole-v1,Pendulum-v1 --algos clipped_ppo,ppo,a2c,trpo \\
      --seeds 5 --timesteps 100000 --out results/
  python -m sb3_ppo_ext.benchmark --envs Hopper-v5 --seeds 3 --timesteps-scale 0.2 --n-jobs 2 --out results/
  python -m sb3_ppo_ext.benchmark --ablation details --envs CartPole-v1,Pendulum-v1 --seeds 3 --out ablation/

Budgets: --budget ENV=N, else --timesteps, else the RL Zoo's PPO budget of the env (same for every
algorithm); --timesteps-scale multiplies the latter two. Re-running the same command skips the runs
whose results are already in --out; --report-only rebuilds summary.md and the plots from them."""


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _budget_overrides(items: Sequence[str]) -> dict[str, int]:
    budgets = {}
    for item in (part for text in items for part in _csv(text)):
        env_id, sep, steps = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--budget expects ENV=STEPS, got {item!r}")
        budgets[env_id] = int(float(steps))
    return budgets


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser.

    :return: the parser of ``python -m sb3_ppo_ext.benchmark``'s options.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sb3_ppo_ext.benchmark",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--envs", type=_csv, required=True, help="comma-separated Gymnasium ids")
    parser.add_argument(
        "--algos",
        type=_csv,
        default=None,
        help=f"comma-separated, from {','.join(ALGOS)} (default: all but the LSTM ones "
        f"{','.join(NAMED_ONLY_ALGOS)}; with --ablation: clipped_ppo)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    parser.add_argument("--timesteps", type=float, default=None, help="env steps per run, every env")
    parser.add_argument("--timesteps-scale", type=float, default=1.0, help="multiply Zoo budgets / --timesteps")
    parser.add_argument("--budget", action="append", default=[], help="per-env budget ENV=STEPS (repeatable)")
    parser.add_argument("--eval-freq", type=int, default=None, help="env steps between evaluations (budget/20)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (default 10)")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), default=None, help="run an ablation's variants")
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="with --ablation: folder of earlier plain runs whose finished runs stand in for the variant that trains "
        "the Zoo settings (same spec and hyperparameters); repeatable",
    )
    parser.add_argument("--n-jobs", type=int, default=1, help="runs in parallel, one process and thread each")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results, summary.md, plots)")
    parser.add_argument("--device", default="cpu", help="torch device for training (default cpu)")
    parser.add_argument("--hyperparams", type=Path, default=None, help="folder of Zoo-format YAML files to use")
    parser.add_argument("--bootstrap-reps", type=int, default=2000, help="bootstrap resamples for CIs")
    parser.add_argument("--title", default=None, help="heading of summary.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report-only", action="store_true", help="only rebuild summary.md and plots")
    return parser


def resolve_budgets(args: argparse.Namespace) -> dict[str, int]:
    """Env steps per env: ``--budget``, else ``--timesteps`` or the Zoo budget times ``--timesteps-scale``.

    :param args: the parsed command line.
    :return: the budget of each env of ``--envs``, in env steps.
    """
    overrides = _budget_overrides(args.budget)
    budgets = {}
    for env_id in args.envs:
        if env_id in overrides:
            budgets[env_id] = overrides[env_id]
        else:
            base = args.timesteps if args.timesteps is not None else zoo_budget(env_id, args.hyperparams)
            budgets[env_id] = max(1, int(round(base * args.timesteps_scale)))
    return budgets


def report(out: Path, *, title: str, command: str, reps: int, console: Console) -> int:
    """Rebuild ``summary.md``/``summary.json`` and the plots from the results in ``out``.

    :param out: the output folder (``--out``).
    :param title: the summary's heading.
    :param command: the command line that reproduces the results, shown in the summary.
    :param reps: bootstrap resamples for the confidence intervals.
    :param console: where progress and errors are printed.
    :return: the exit status: 0, or 1 when ``out`` holds no finished run.
    """
    results = statistics.load_results(out)
    if not results:
        console.print(f"[red]no finished runs in {out}[/red]")
        return 1
    rows = statistics.summarize(results, reps)
    aggregates = statistics.aggregate(results, reps) if len(results) > 1 else None
    names = plots.plot_all(out, results, aggregates, reps)
    markdown = statistics.summary_markdown(
        results, rows, aggregates, title=title, command=command, plots=names, reps=reps
    )
    md_path, _ = statistics.write_summary(out, rows, markdown)
    console.print(f"wrote {md_path} and {len(names)} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark command.

    :param argv: the arguments (None: ``sys.argv[1:]``).
    :return: the exit status: 0, 1 when a run failed or nothing finished, 2 for invalid arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    console = Console()
    # the same command without --report-only trains what is missing and rebuilds this very summary
    command = "python -m sb3_ppo_ext.benchmark " + shlex.join(a for a in argv if a != "--report-only")
    title = args.title or (f"Ablation: {args.ablation}" if args.ablation else "Benchmark")
    if not args.report_only:
        default = [algo for algo in ALGOS if algo not in NAMED_ONLY_ALGOS]
        algos = args.algos or (["clipped_ppo"] if args.ablation else default)
        if distributed.world_size() > 1:  # torchrun: every rank trains each run, in this process; rank 0 writes
            others = [algo for algo in algos if ALGOS[algo] != ALGOS["clipped_ppo"]]
            if others:
                console.print(f"[red]error:[/red] under torchrun only ClippedPPO trains data-parallel, not {others}")
                return 2
            args.n_jobs = 1
            if not distributed.is_main_process():
                console, args.no_progress = Console(quiet=True), True
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        try:
            specs = plan(
                args.envs,
                algos,
                seeds,
                resolve_budgets(args),
                ablation=args.ablation,
                eval_freq=args.eval_freq,
                eval_episodes=args.eval_episodes,
                device=args.device,
                hyperparams_dir=args.hyperparams,
            )
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
        outcome = execute(
            specs,
            args.out,
            n_jobs=args.n_jobs,
            hyperparams_dir=args.hyperparams,
            show_progress=not args.no_progress,
            reuse=args.reuse,
            console=console,
        )
        if outcome.failed:
            console.print(f"[red]{len(outcome.failed)} runs failed[/red]: {', '.join(outcome.failed)}")
    if not distributed.is_main_process():
        return 0
    status = report(args.out, title=title, command=command, reps=args.bootstrap_reps, console=console)
    return 1 if not args.report_only and outcome.failed else status
