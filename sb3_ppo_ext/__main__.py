"""Command line: train, evaluate and save a :class:`~sb3_ppo_ext.ClippedPPO` agent.

::

    python -m sb3_ppo_ext train                       # CartPole-v1, RL Zoo settings, 100k steps
    python -m sb3_ppo_ext train --env Pendulum-v1 --timesteps 50000 --hyperparams learning_rate=lin_1e-3
    python -m sb3_ppo_ext enjoy --load clipped_ppo_CartPole-v1.zip --env CartPole-v1
    python -m sb3_ppo_ext export --load clipped_ppo_CartPole-v1.zip --out policy.onnx   # or --torchscript
    python -m sb3_ppo_ext benchmark ...               # delegates to sb3_ppo_ext.benchmark

Hyperparameters come from the RL Baselines3 Zoo's tuned settings for the env (``sb3_ppo_ext.zoo.presets``),
else from ClippedPPO's defaults (which are SB3 PPO's); ``--preset atari|mujoco`` picks a column of the
seed's table instead, and ``--hyperparams key=value`` overrides any of them. Envs are built the Zoo's
way by :func:`sb3_ppo_ext.zoo.envs.make_env`. MLP policies run with one torch thread unless ``--threads``
says otherwise (faster on shared cores); policies with convolutions keep torch's default.

``train`` also runs under ``torchrun --nproc_per_node=N -m sb3_ppo_ext train ...`` (data-parallel,
:mod:`sb3_ppo_ext.distributed`): ``--n-envs`` and the batch settings are per rank, ``--timesteps`` counts
every rank's steps, and rank 0 alone saves, evaluates and prints.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from torch import nn

from sb3_ppo_ext import ClippedPPO, distributed
from sb3_ppo_ext.errors import ExportError
from sb3_ppo_ext.zoo import presets
from sb3_ppo_ext.zoo.envs import make_env
from sb3_ppo_ext.zoo.presets import Settings

DEFAULT_ENV = "CartPole-v1"
ALGO_NAME = "clipped_ppo"
# The budget where the Zoo block (or the seed's preset) gives none.
DEFAULT_TIMESTEPS = 1_000_000


# -- hyperparameters ---------------------------------------------------------------------------------


def parse_hyperparam(item: str) -> tuple[str, Any]:
    """Read one ``key=value`` override; the value is a Python literal when it parses as one, else a string.

    ``n_epochs=4`` -> ``("n_epochs", 4)``, ``learning_rate=lin_1e-3`` -> ``("learning_rate", "lin_1e-3")``,
    ``policy_kwargs=dict(net_arch=[64])`` -> a string, evaluated later like the Zoo does.

    :param item: one ``key=value`` word of ``--hyperparams``.
    :return: ``(key, value)``.
    :raises argparse.ArgumentTypeError: without ``=`` or without a key.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
    text = text.strip()
    try:
        value: Any = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)
    return key, value


def base_block(env_id: str, preset: str | None = None) -> tuple[dict[str, Any], str]:
    """The Zoo-style hyperparameter block for ``env_id`` and a word on where it came from.

    :param env_id: the Gymnasium id.
    :param preset: a preset name, or None for the Zoo's block.
    :return: the block and its origin.
    """
    if preset is not None:
        kind = "preset" if preset in presets.PRESET_FILES else "seed preset"
        return dict(presets.preset(preset, env_id).raw), f"{kind} {preset!r}"
    key, block = presets.zoo_block(ALGO_NAME, env_id)
    return dict(block), "ClippedPPO defaults" if key == "default" else "RL Zoo"


def resolve_settings(
    env_id: str,
    overrides: Sequence[tuple[str, Any]] = (),
    preset: str | None = None,
    n_envs: int | None = None,
    n_timesteps: int | None = None,
) -> tuple[Settings, str]:
    """Zoo (or preset, or default) block for ``env_id`` with ``overrides`` applied, parsed.

    :param env_id: the Gymnasium id.
    :param overrides: ``(key, value)`` pairs from ``--hyperparams``.
    :param preset: ``--preset`` (``"atari"``, ``"mujoco"``, ``"mujoco-tuned"``), or None for the Zoo's block.
    :param n_envs: ``--n-envs``, over the block's.
    :param n_timesteps: ``--timesteps``, over the block's.
    :return: the settings (``n_timesteps`` always set) and where they came from, for the log line.
    """
    block, source = base_block(env_id, preset)
    block.update(dict(overrides))
    if n_envs is not None:
        block["n_envs"] = n_envs
    if n_timesteps is not None:
        block["n_timesteps"] = n_timesteps
    block.setdefault("n_timesteps", DEFAULT_TIMESTEPS)
    return presets.parse_zoo_block(block), source + (" + overrides" if overrides else "")


# -- environments ------------------------------------------------------------------------------------


def vecnormalize_path(model_path: str | Path) -> Path:
    """Where the ``VecNormalize`` statistics of a saved model live: ``<model>_vecnormalize.pkl``.

    :param model_path: the model's path, with or without ``.zip``.
    :return: the statistics' path.
    """
    path = Path(model_path)
    stem = path.with_suffix("") if path.suffix == ".zip" else path
    return stem.with_name(stem.name + "_vecnormalize.pkl")


def _device(requested: str | None, policy: str) -> str:
    # an MLP on CPU beats a GPU at PPO's batch sizes (SB3 warns about it); CNNs go to the GPU if any
    if requested is not None:
        return requested
    return "auto" if policy == "CnnPolicy" else "cpu"


def _set_threads(requested: int | None, policy: nn.Module) -> None:
    # PPO's MLPs multiply small matrices: extra threads mostly contend with the envs and with other
    # processes (two runs on 2 busy cores: 20k CartPole steps in 8.2 s with torch's default, 5.1 s with
    # 1 thread). Convolutions do gain from threads, so CNN policies keep torch's default.
    if requested is not None:
        torch.set_num_threads(requested)
    elif not any(isinstance(module, nn.Conv2d) for module in policy.modules()):
        torch.set_num_threads(1)


def _plus_minus() -> str:
    try:
        "±".encode(sys.stdout.encoding or "ascii")
        return "±"
    except (UnicodeEncodeError, LookupError):
        return "+/-"


# -- subcommands -------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    """Train, evaluate (deterministic) and save; print one result line.

    :param args: the parsed ``train`` command line.
    :return: the exit status.
    """
    start = time.perf_counter()
    settings, source = resolve_settings(args.env, args.hyperparams, args.preset, args.n_envs, args.timesteps)
    env = make_env(args.env, settings, seed=args.seed)
    if args.verbose and distributed.is_main_process():
        print(f"{args.env}: {source} settings {settings.raw}", flush=True)
    model = ClippedPPO(
        settings.policy,
        env,
        seed=args.seed,
        device=_device(args.device, settings.policy),
        verbose=args.verbose,
        tensorboard_log=args.tensorboard_log,
        **settings.model_kwargs,
    )
    _set_threads(args.threads, model.policy)
    model.learn(settings.n_timesteps or DEFAULT_TIMESTEPS, progress_bar=args.progress_bar)
    train_seconds = time.perf_counter() - start
    if not model.distributed.is_main_process:  # torchrun: rank 0 saves, evaluates and prints
        env.close()
        return 0

    save_path = Path(args.save_path or f"{ALGO_NAME}_{args.env.replace('/', '_')}")
    if save_path.suffix != ".zip":
        save_path = save_path.with_name(save_path.name + ".zip")
    save_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(save_path)
    saved = str(save_path)

    # evaluated on a separate env, with the training statistics frozen when there are any
    stats_path: Path | bool = False
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        stats_path = vecnormalize_path(save_path)
        vec_normalize.save(str(stats_path))
        saved += f" (+ {stats_path.name})"
    eval_seed = None if args.seed is None else args.seed + 10_000
    eval_env = make_env(args.env, settings, 1, eval_seed, normalize=stats_path, evaluation=True)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True)
    eval_env.close()
    env.close()
    total_seconds = time.perf_counter() - start
    print(
        f"ClippedPPO {args.env}: mean return {mean_return:.2f} {_plus_minus()} {std_return:.2f} "
        f"over {args.eval_episodes} episodes (deterministic) | {model.num_timesteps} steps, seed {args.seed} | "
        f"saved {saved} | wall time {total_seconds:.1f} s (training {train_seconds:.1f} s)",
        flush=True,
    )
    return 0


def enjoy(args: argparse.Namespace) -> int:
    """Load a saved model and run it for a few episodes, printing each return.

    :param args: the parsed ``enjoy`` command line.
    :return: the exit status.
    """
    settings, source = resolve_settings(args.env, args.hyperparams, args.preset, n_envs=1)
    stats_path = vecnormalize_path(args.load)
    try:
        env = make_env(
            args.env,
            settings,
            1,
            args.seed,
            normalize=stats_path if stats_path.exists() else False,
            evaluation=True,
            env_kwargs={"render_mode": "human"} if args.render else None,
        )
    except ValueError as error:  # make_env's: statistics saved with the model that do not fit this env
        raise SystemExit(
            f"error: {error} (settings: {source}). Pass the --env, --preset and --hyperparams the model was trained "
            "with (--preset mujoco-tuned, for example, leaves Ant-v5's contact forces out of the observation)."
        ) from error
    model = ClippedPPO.load(args.load, env=env, device=_device(args.device, settings.policy))
    _set_threads(args.threads, model.policy)
    returns: list[float] = []
    obs = env.reset()
    while len(returns) < args.episodes:
        action, _ = model.predict(obs, deterministic=not args.stochastic)
        obs, _, dones, infos = env.step(action)
        if dones[0] and "episode" in infos[0]:
            returns.append(float(infos[0]["episode"]["r"]))
            print(f"episode {len(returns)}: return {returns[-1]:.2f}, length {infos[0]['episode']['l']}", flush=True)
    env.close()
    print(
        f"ClippedPPO {args.env} ({args.load}): mean return {np.mean(returns):.2f} {_plus_minus()} "
        f"{np.std(returns):.2f} over {len(returns)} episodes",
        flush=True,
    )
    return 0


def export_policy(args: argparse.Namespace) -> int:
    """Write a saved model's deterministic policy as ONNX (or TorchScript); print what was written.

    :param args: the parsed ``export`` command line.
    :return: the exit status.
    """
    from sb3_ppo_ext.export import export, read_metadata

    load = Path(args.load)
    export_format = "torchscript" if args.torchscript else None
    out = Path(args.out) if args.out else load.with_suffix(".pt" if args.torchscript else ".onnx")
    if export_format is None and out.suffix.lower() not in {".onnx", ".pt", ".pth", ".ts"}:
        export_format = "onnx"
    # the statistics `train` saves next to the model, unless told otherwise (as `enjoy` does)
    stats: Path | None = None
    if args.vecnormalize:
        stats = Path(args.vecnormalize)
    elif not args.no_vecnormalize and vecnormalize_path(load).exists():
        stats = vecnormalize_path(load)
    try:
        model = ClippedPPO.load(load, device="cpu")
        written = export(
            model,
            out,
            export_format,  # type: ignore[arg-type]
            vecnormalize=stats,
            with_value=args.with_value,
            action_masks=args.action_masks,
        )
    except (ExportError, ImportError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    metadata = read_metadata(written)

    def describe(specs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{s['name']}{list(s['shape'])} {s['dtype']}" for s in specs)

    print(
        f"exported {load} -> {written} ({metadata['format']}) | inputs: {describe(metadata['inputs'])} | "
        f"outputs: {describe(metadata['outputs'])} | VecNormalize: {stats if stats is not None else 'none'}",
        flush=True,
    )
    return 0


def benchmark(argv: Sequence[str]) -> int:
    """Run ``python -m sb3_ppo_ext.benchmark argv`` in this process; return its exit status.

    :param argv: the harness's command-line arguments.
    :return: the exit status.
    """
    try:
        # the benchmark needs the "benchmark" extra (rich, rliable, matplotlib, ...)
        from sb3_ppo_ext.benchmark.cli import main as benchmark_main
    except ImportError as exc:
        print(
            f"the benchmark subcommand is not available: {exc} (pip install 'sb3_ppo_ext[benchmark]')", file=sys.stderr
        )
        return 2
    return benchmark_main(list(argv))


# -- argument parsing --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(float(text))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default=DEFAULT_ENV, help="Gymnasium env id (default: %(default)s)")
    parser.add_argument(
        "--preset",
        choices=tuple(presets.preset_names()),
        default=None,
        help="use a column of the seed's hyperparameter table instead of the RL Zoo settings",
    )
    parser.add_argument(
        "--hyperparams",
        nargs="+",
        action="extend",
        type=parse_hyperparam,
        default=[],
        metavar="KEY=VALUE",
        help="override settings, Zoo-style: n_epochs=4 learning_rate=lin_1e-3 'policy_kwargs=dict(net_arch=[64])'",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cpu for MLPs, auto for CNNs)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch.set_num_threads (default: 1 for MLP policies, faster than torch's default when other "
        "processes share the cores; torch's default for policies with convolutions)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sb3_ppo_ext`` argument parser.

    :return: the parser, with the ``train``, ``enjoy``, ``export`` and ``benchmark`` subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sb3_ppo_ext",
        description="Train, evaluate and save ClippedPPO agents.",
        epilog="benchmark ARGS...: run the multi-seed benchmark (python -m sb3_ppo_ext benchmark --help)",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,enjoy,export,benchmark}", required=True)

    p_train = sub.add_parser("train", help="train, evaluate and save an agent (default: CartPole-v1)")
    _add_env_arguments(p_train)
    p_train.add_argument("--timesteps", type=_positive_int, default=None, help="training steps (default: Zoo's)")
    p_train.add_argument("--seed", type=int, default=0, help="seed of the model and envs (default: %(default)s)")
    p_train.add_argument("--n-envs", type=_positive_int, default=None, help="parallel envs (default: Zoo's)")
    p_train.add_argument("--save-path", default=None, help="model path (default: clipped_ppo_<env>.zip)")
    p_train.add_argument("--eval-episodes", type=_positive_int, default=10, help="evaluation episodes")
    p_train.add_argument("--progress-bar", action="store_true", help="show a progress bar (needs tqdm and rich)")
    p_train.add_argument("--tensorboard-log", default=None, help="tensorboard log folder")
    p_train.add_argument("-v", "--verbose", type=int, default=0, help="0: result line only, 1: SB3's training logs")
    p_train.set_defaults(handler=train)

    p_enjoy = sub.add_parser("enjoy", help="run a saved agent for a few episodes")
    p_enjoy.add_argument("--load", required=True, help="path of a saved model (.zip)")
    _add_env_arguments(p_enjoy)
    p_enjoy.add_argument("--episodes", type=_positive_int, default=5, help="episodes to run")
    p_enjoy.add_argument("--seed", type=int, default=None, help="env seed")
    p_enjoy.add_argument("--render", action="store_true", help="render_mode='human' (needs pygame)")
    p_enjoy.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    p_enjoy.set_defaults(handler=enjoy)

    p_export = sub.add_parser("export", help="write a saved agent's deterministic policy as ONNX or TorchScript")
    p_export.add_argument("--load", required=True, help="path of a saved model (.zip)")
    p_export.add_argument("--out", default=None, help="file to write (default: the model's path with .onnx or .pt)")
    p_export.add_argument(
        "--vecnormalize",
        default=None,
        metavar="PATH",
        help="VecNormalize statistics to bake in, so the graph takes raw observations "
        "(default: <model>_vecnormalize.pkl when it exists)",
    )
    p_export.add_argument("--no-vecnormalize", action="store_true", help="do not bake in VecNormalize statistics")
    p_export.add_argument("--with-value", action="store_true", help="add the critic's value as a second output")
    p_export.add_argument("--action-masks", action="store_true", help="add an action_masks input (masked policies)")
    p_export.add_argument("--torchscript", action="store_true", help="write TorchScript instead of ONNX")
    p_export.set_defaults(handler=export_policy)

    sub.add_parser("benchmark", help="multi-seed benchmark (delegates to sb3_ppo_ext.benchmark)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sb3_ppo_ext``.

    :param argv: the command line without the program name; None: ``sys.argv[1:]``.
    :return: the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "benchmark":
        # everything after the word goes to the benchmark's own parser, --help included
        return benchmark(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
