"""Plan the runs of a benchmark and execute them in parallel, resuming where a previous call stopped."""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sb3_ppo_ext.benchmark.ablations import ABLATION_ALGOS, ABLATIONS, applies
from sb3_ppo_ext.benchmark.runs import (
    ALGOS,
    RunSpec,
    is_finished,
    reusable_result,
    run_settings,
    train_and_evaluate,
    write_json,
)
from sb3_ppo_ext.errors import DistributedError
from sb3_ppo_ext.zoo import presets

# Evaluations per run when --eval-freq is not given.
DEFAULT_EVALUATIONS = 20


def zoo_budget(env_id: str, hyperparams_dir: Path | None = None) -> int:
    """The Zoo's PPO budget for ``env_id``; every algorithm gets it, so curves share one x-axis.

    An env that the PPO file lists only under its ``default``/``atari`` block but the recurrent file
    (``ppo_lstm.yml``'s mirror) lists by name, as the NoVel tasks, takes the recurrent file's budget.

    :param env_id: a Gymnasium id.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :return: the budget, in env steps.
    :raises ValueError: the settings give the env no ``n_timesteps``.
    """
    folder = presets.HYPERPARAMS_DIR if hyperparams_dir is None else Path(hyperparams_dir)
    key, block = presets.zoo_block("clipped_ppo", env_id, folder / presets.HYPERPARAMS_FILES["clipped_ppo"])
    recurrent = folder / presets.HYPERPARAMS_FILES["clipped_ppo_lstm"]
    if key != env_id and recurrent.exists():
        block = presets.load_zoo_file(recurrent).get(env_id, block)
    budget = presets.parse_zoo_block(block).n_timesteps
    if budget is None:
        raise ValueError(f"no n_timesteps for {env_id!r} in the Zoo settings: pass --timesteps or --budget")
    return budget


def plan(
    envs: Sequence[str],
    algos: Sequence[str],
    seeds: Sequence[int],
    budgets: dict[str, int],
    *,
    ablation: str | None = None,
    eval_freq: int | None = None,
    eval_episodes: int = 10,
    device: str = "cpu",
    hyperparams_dir: Path | None = None,
) -> list[RunSpec]:
    """Every (env, algorithm or ablation variant, seed) run, as specs.

    Ablation variants that would repeat the reference on an env (see ``ablations.applies``) are left out.

    :param envs: Gymnasium ids.
    :param algos: names from :data:`~sb3_ppo_ext.benchmark.runs.ALGOS` (one, with an ablation).
    :param seeds: the seeds, each run once per env and algorithm or variant.
    :param budgets: training env steps per env id.
    :param ablation: a key of :data:`~sb3_ppo_ext.benchmark.ablations.ABLATIONS`, or None for a comparison.
    :param eval_freq: env steps between evaluations; default: the budget / 20.
    :param eval_episodes: episodes per evaluation.
    :param device: torch device for training.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :return: the specs, by env, algorithm, variant and seed.
    :raises ValueError: an unknown algorithm or ablation, or an ablation with the wrong algorithms.
    """
    unknown = [algo for algo in algos if algo not in ALGOS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; known: {sorted(ALGOS)}")
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; known: {sorted(ABLATIONS)}")
        if len(algos) != 1 or algos[0] not in ABLATION_ALGOS[ablation]:
            raise ValueError(f"--ablation {ablation} runs one algorithm out of {ABLATION_ALGOS[ablation]}")
    variants = list(ABLATIONS[ablation]) if ablation is not None else [""]
    specs = [
        RunSpec(
            env_id=env_id,
            algo=algo,
            seed=seed,
            timesteps=budgets[env_id],
            eval_freq=eval_freq or max(1, budgets[env_id] // DEFAULT_EVALUATIONS),
            eval_episodes=eval_episodes,
            ablation=ablation,
            variant=variant,
            device=device,
        )
        for env_id in envs
        for algo in algos
        for variant in variants
        for seed in seeds
    ]
    if ablation is None:
        return specs
    # The predicate sees the Zoo settings, before the variant changes them: one per (env, algorithm).
    first = {(spec.env_id, spec.algo): spec for spec in reversed(specs)}
    zoo = {key: run_settings(dataclasses.replace(spec, ablation=None), hyperparams_dir) for key, spec in first.items()}
    return [spec for spec in specs if applies(ablation, spec.variant, zoo[spec.env_id, spec.algo])]


@dataclass
class Outcome:
    """What :func:`execute` did: runs skipped as already finished, completed now, and failed."""

    skipped: list[RunSpec] = field(default_factory=list)
    completed: list[RunSpec] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# Set in each worker process by the pool's initializer: progress messages go back through it.
_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    torch.set_num_threads(1)
    _progress_queue = progress_queue


def _report_to_queue(key: str, steps: int) -> None:
    _progress_queue.put((key, steps))


def _run_in_worker(spec: RunSpec, out: Path, hyperparams_dir: Path | None) -> dict[str, Any]:
    return train_and_evaluate(spec, out, report=_report_to_queue, hyperparams_dir=hyperparams_dir)


def _runs_to_do(
    specs: Sequence[RunSpec],
    out: Path,
    reuse: Sequence[Path],
    hyperparams_dir: Path | None,
    outcome: Outcome,
    console: Console,
) -> list[RunSpec]:
    """The specs without a result in ``out``; finished or reusable ones go to ``outcome.skipped``."""
    todo = []
    for spec in specs:
        if not is_finished(spec, out):
            reused = next(
                (r for source in reuse if (r := reusable_result(spec, Path(source), hyperparams_dir)) is not None),
                None,
            )
            if reused is None:
                todo.append(spec)
                continue
            write_json(spec.result_path(out), reused)
            console.print(f"reused {spec.key} from {reused['reused_from']}")
        outcome.skipped.append(spec)
    return todo


def execute(
    specs: Sequence[RunSpec],
    out: Path,
    *,
    n_jobs: int = 1,
    hyperparams_dir: Path | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    reuse: Sequence[Path] = (),
) -> Outcome:
    """Run every spec whose result is not already in ``out``; ``n_jobs`` runs at a time.

    Each run writes its result file as soon as it finishes and saves a checkpoint after each
    evaluation, so an interrupted call loses only the steps each run in flight made since its last
    evaluation; the next call continues those runs. A failed run is reported and left without a
    result, so the next call retries it.

    :param specs: the runs (:func:`plan`).
    :param out: the output folder: results go to ``out/raw``, checkpoints to ``out/partial``.
    :param n_jobs: runs at a time, each in its own process with one torch thread.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :param show_progress: show rich progress bars.
    :param console: where messages are printed (None: a new rich console).
    :param reuse: folders of earlier plain runs (``--out`` of a run without ``--ablation``). An ablation variant
        that trains exactly the Zoo settings (``ablations.ZOO_VARIANTS``) takes a finished run with the same spec
        and hyperparameters from there instead of training it again; its result file records ``reused_from``.
    :return: which runs were skipped, completed and failed.
    """
    out = Path(out)
    console = console or Console()
    outcome = Outcome()
    todo = _runs_to_do(specs, out, reuse, hyperparams_dir, outcome, console)
    if outcome.skipped:
        console.print(f"resuming: {len(outcome.skipped)} of {len(specs)} runs already finished in {out}")
    if not todo:
        return outcome

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress,
    )
    runs_task = progress.add_task("runs", total=len(todo))
    steps_task = progress.add_task("env steps", total=sum(spec.timesteps for spec in todo))

    def finished(spec: RunSpec, result: dict[str, Any] | None, error: str | None) -> None:
        progress.advance(runs_task)
        if error is None:
            outcome.completed.append(spec)
            if result:  # empty on the ranks other than 0 of a torchrun launch
                console.print(
                    f"done   {spec.key}: final return {result['final_return']:.1f} ({result['wall_s']:.0f} s)"
                )
        else:
            outcome.failed[spec.key] = error
            console.print(f"[red]failed {spec.key}[/red]\n{error}")

    with progress:
        if n_jobs <= 1:
            for spec in todo:
                try:
                    result = train_and_evaluate(
                        spec,
                        out,
                        report=lambda _key, steps: progress.advance(steps_task, steps),
                        hyperparams_dir=hyperparams_dir,
                    )
                except DistributedError:
                    raise  # torchrun: the other ranks are gone, the next run would wait for them
                except Exception:
                    finished(spec, None, traceback.format_exc())
                else:
                    finished(spec, result, None)
        else:
            _execute_in_pool(todo, out, n_jobs, hyperparams_dir, progress, steps_task, finished)
    return outcome


def _execute_in_pool(
    todo: Sequence[RunSpec],
    out: Path,
    n_jobs: int,
    hyperparams_dir: Path | None,
    progress: Progress,
    steps_task: Any,
    finished: Callable[[RunSpec, dict[str, Any] | None, str | None], None],
) -> None:
    # spawn: fresh interpreters, no forked torch/OpenMP state; each sets torch threads to 1. One run per
    # interpreter (Python >= 3.11): a run executes the code checked out when it starts, the commit it records
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    one_run_each = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(
        n_jobs, mp_context=context, initializer=_init_worker, initargs=(progress_queue,), **one_run_each
    ) as pool:
        pending: dict[Future, RunSpec] = {
            pool.submit(_run_in_worker, spec, out, hyperparams_dir): spec for spec in todo
        }
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(progress_queue, progress, steps_task)
            for future in done:
                spec = pending.pop(future)
                error = future.exception()
                if error is None:
                    finished(spec, future.result(), None)
                else:
                    finished(spec, None, "".join(traceback.format_exception(error)))
    _drain(progress_queue, progress, steps_task)


def _drain(progress_queue: Any, progress: Progress, steps_task: Any) -> None:
    while True:
        try:
            _key, steps = progress_queue.get_nowait()
        except queue.Empty:
            return
        progress.advance(steps_task, steps)
