"""Command line: train, evaluate and save a :class:`~sb3_ppo_ext.ClippedPPO` agent.

::

    python -m sb3_ppo_ext train                       # CartPole-v1, RL Zoo settings, 100k steps
    python -m sb3_ppo_ext train --env Pendulum-v1 --timesteps 50000 --hyperparams learning_rate=lin_1e-3
    python -m sb3_ppo_ext enjoy --load clipped_ppo_CartPole-v1.zip --env CartPole-v1
    python -m sb3_ppo_ext benchmark ...               # delegates to sb3_ppo_ext.benchmark

Hyperparameters come from the RL Baselines3 Zoo's tuned settings for the env (``sb3_ppo_ext.presets``),
else from ClippedPPO's defaults (which are SB3 PPO's); ``--preset atari|mujoco`` picks a column of the
seed's table instead, and ``--hyperparams key=value`` overrides any of them.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import runpy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ENV = "CartPole-v1"
ALGO_NAME = "clipped_ppo"

# The RL Zoo's tuned CartPole-v1 block (rl_zoo3 hyperparams/ppo.yml): used when sb3_ppo_ext.presets
# cannot be imported, so that the default command always trains with these settings.
CARTPOLE_ZOO_BLOCK: dict[str, Any] = {
    "n_envs": 8,
    "n_timesteps": 100_000,
    "policy": "MlpPolicy",
    "n_steps": 32,
    "batch_size": 256,
    "gae_lambda": 0.8,
    "gamma": 0.98,
    "n_epochs": 20,
    "ent_coef": 0.0,
    "learning_rate": "lin_1e-3",
    "clip_range": "lin_0.2",
}
# ClippedPPO's own defaults for envs the Zoo does not list (its "default" block).
DEFAULT_BLOCK: dict[str, Any] = {"n_timesteps": 1_000_000, "policy": "MlpPolicy"}

# Zoo keys that describe the environment or the run rather than constructor arguments.
_ENV_KEYS = ("n_envs", "n_timesteps", "policy", "normalize", "env_wrapper", "frame_stack", "env_kwargs")
_SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf")


@dataclass
class RunSettings:
    """Everything ``train``/``enjoy`` need to build the envs and the model.

    :param block: the Zoo-style block (strings not parsed yet), after ``--hyperparams`` overrides.
    :param source: where the block came from, for the log line.
    :param policy: policy alias.
    :param n_envs: training envs.
    :param n_timesteps: training budget.
    :param model_kwargs: ClippedPPO constructor arguments (schedules and policy_kwargs parsed).
    :param normalize: ``VecNormalize`` keyword arguments, or ``None``.
    :param wrapper_class: ``make_vec_env``'s ``wrapper_class``, or ``None``.
    :param frame_stack: ``VecFrameStack`` depth, or ``None``.
    :param env_kwargs: ``gym.make`` keyword arguments.
    """

    block: dict[str, Any]
    source: str
    policy: str = "MlpPolicy"
    n_envs: int = 1
    n_timesteps: int = DEFAULT_BLOCK["n_timesteps"]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    normalize: dict[str, Any] | None = None
    wrapper_class: Callable[[Any], Any] | None = None
    frame_stack: int | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)


# -- hyperparameters ---------------------------------------------------------------------------------


def parse_hyperparam(item: str) -> tuple[str, Any]:
    """Read one ``key=value`` override; the value is a Python literal when it parses as one, else a string.

    ``n_epochs=4`` -> ``("n_epochs", 4)``, ``learning_rate=lin_1e-3`` -> ``("learning_rate", "lin_1e-3")``,
    ``policy_kwargs=dict(net_arch=[64])`` -> a string, evaluated later like the Zoo does.
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


def _is_atari(env_id: str) -> bool:
    return "NoFrameskip" in env_id or env_id.startswith("ALE/")


def _register_atari() -> None:
    try:
        import ale_py
        import gymnasium as gym

        gym.register_envs(ale_py)
    except ImportError:
        pass


def _presets_module() -> Any | None:
    """``sb3_ppo_ext.presets`` when it imports (it needs PyYAML), else ``None``."""
    try:
        return importlib.import_module("sb3_ppo_ext.presets")
    except ImportError:
        return None


def base_block(env_id: str, preset: str | None = None) -> tuple[dict[str, Any], str]:
    """The Zoo-style hyperparameter block for ``env_id`` and a word on where it came from."""
    presets = _presets_module()
    if preset is not None:
        if presets is None:
            raise SystemExit("--preset needs sb3_ppo_ext.presets (and PyYAML): pip install pyyaml")
        return dict(presets.preset(preset).raw), f"seed preset {preset!r}"
    if presets is not None and hasattr(presets, "zoo_settings"):
        key = "atari" if _is_atari(env_id) else env_id
        settings = presets.zoo_settings(ALGO_NAME, key)
        zoo_file = presets.HYPERPARAMS_DIR / presets.HYPERPARAMS_FILES[ALGO_NAME]
        listed = key in presets.load_zoo_file(zoo_file)
        return dict(settings.raw), "RL Zoo" if listed else "ClippedPPO defaults"
    if env_id == DEFAULT_ENV:
        return dict(CARTPOLE_ZOO_BLOCK), "RL Zoo"
    return dict(DEFAULT_BLOCK), "ClippedPPO defaults"


def _eval_python(text: str) -> Any:
    # the Zoo writes policy_kwargs as Python, e.g. "dict(net_arch=[64], activation_fn=nn.ReLU)"
    from torch import nn

    return eval(text, {"__builtins__": {}}, {"dict": dict, "nn": nn, "True": True, "False": False, "None": None})  # noqa: S307


def _parse_block_fallback(block: dict[str, Any]) -> RunSettings:
    """Minimal Zoo-block parser for when ``sb3_ppo_ext.presets`` is unavailable (no env wrappers)."""
    from sb3_ppo_ext.schedules import parse_schedule

    if block.get("env_wrapper"):
        raise SystemExit("env_wrapper needs sb3_ppo_ext.presets (and PyYAML): pip install pyyaml")
    kwargs = {key: value for key, value in block.items() if key not in _ENV_KEYS}
    for key in _SCHEDULE_KEYS:
        if key in kwargs:
            kwargs[key] = parse_schedule(kwargs[key])
    if isinstance(kwargs.get("policy_kwargs"), str):
        kwargs["policy_kwargs"] = _eval_python(kwargs["policy_kwargs"])
    normalize = block.get("normalize")
    if isinstance(normalize, str):
        normalize = _eval_python(normalize)
    if normalize is True:
        normalize = {"gamma": block["gamma"]} if "gamma" in block else {}
    return RunSettings(
        block=block,
        source="",
        policy=block.get("policy", "MlpPolicy"),
        n_envs=int(block.get("n_envs", 1)),
        n_timesteps=int(float(block.get("n_timesteps", DEFAULT_BLOCK["n_timesteps"]))),
        model_kwargs=kwargs,
        normalize=dict(normalize) if normalize else None,
        frame_stack=block.get("frame_stack"),
        env_kwargs=dict(block.get("env_kwargs") or {}),
    )


def resolve_settings(
    env_id: str,
    overrides: Sequence[tuple[str, Any]] = (),
    preset: str | None = None,
    n_envs: int | None = None,
    n_timesteps: int | None = None,
) -> RunSettings:
    """Zoo (or preset, or default) block for ``env_id`` with ``overrides`` applied, parsed."""
    block, source = base_block(env_id, preset)
    block.update(dict(overrides))
    if n_envs is not None:
        block["n_envs"] = n_envs
    if n_timesteps is not None:
        block["n_timesteps"] = n_timesteps
    presets = _presets_module()
    if presets is None:
        settings = _parse_block_fallback(block)
    else:
        parsed = presets.parse_zoo_block(block)
        settings = RunSettings(
            block=block,
            source="",
            policy=parsed.policy,
            n_envs=parsed.n_envs,
            n_timesteps=parsed.n_timesteps or DEFAULT_BLOCK["n_timesteps"],
            model_kwargs=dict(parsed.model_kwargs),
            normalize=parsed.normalize,
            # an empty env_wrapper entry means no wrapper
            wrapper_class=parsed.wrapper_class() if any(parsed.env_wrapper) else None,
            frame_stack=parsed.frame_stack,
            env_kwargs=dict(parsed.env_kwargs),
        )
    settings.source = source + (" + overrides" if overrides else "")
    return settings


# -- environments ------------------------------------------------------------------------------------


def vecnormalize_path(model_path: str | Path) -> Path:
    """Where the ``VecNormalize`` statistics of a saved model live: ``<model>_vecnormalize.pkl``."""
    path = Path(model_path)
    stem = path.with_suffix("") if path.suffix == ".zip" else path
    return stem.with_name(stem.name + "_vecnormalize.pkl")


def make_env(env_id: str, settings: RunSettings, n_envs: int, seed: int | None) -> Any:
    """A monitored VecEnv for ``env_id`` with the settings' wrappers and frame stacking (no normalization)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    if _is_atari(env_id):
        _register_atari()
    env = make_vec_env(
        env_id, n_envs=n_envs, seed=seed, wrapper_class=settings.wrapper_class, env_kwargs=settings.env_kwargs
    )
    if settings.frame_stack:
        env = VecFrameStack(env, n_stack=int(settings.frame_stack))
    return env


def _device(requested: str | None, policy: str) -> str:
    # an MLP on CPU beats a GPU at PPO's batch sizes (SB3 warns about it); CNNs go to the GPU if any
    if requested is not None:
        return requested
    return "auto" if policy == "CnnPolicy" else "cpu"


def _plus_minus() -> str:
    try:
        "±".encode(sys.stdout.encoding or "ascii")
        return "±"
    except (UnicodeEncodeError, LookupError):
        return "+/-"


# -- subcommands -------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    """Train, evaluate (deterministic) and save; print one result line."""
    import torch
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_ppo_ext import ClippedPPO

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = resolve_settings(args.env, args.hyperparams, args.preset, args.n_envs, args.timesteps)
    env = make_env(args.env, settings, settings.n_envs, args.seed)
    if settings.normalize is not None:
        env = VecNormalize(env, **settings.normalize)
    device = _device(args.device, settings.policy)
    if args.verbose:
        print(f"{args.env}: {settings.source} settings {settings.block}", flush=True)
    model = ClippedPPO(
        settings.policy,
        env,
        seed=args.seed,
        device=device,
        verbose=args.verbose,
        tensorboard_log=args.tensorboard_log,
        **settings.model_kwargs,
    )
    model.learn(settings.n_timesteps, progress_bar=args.progress_bar)
    train_seconds = time.perf_counter() - start

    save_path = Path(args.save_path or f"{ALGO_NAME}_{args.env.replace('/', '_')}")
    if save_path.suffix != ".zip":
        save_path = save_path.with_name(save_path.name + ".zip")
    save_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(save_path)
    saved = str(save_path)

    eval_env = make_env(args.env, settings, 1, None if args.seed is None else args.seed + 10_000)
    if isinstance(env, VecNormalize):
        stats_path = vecnormalize_path(save_path)
        env.save(str(stats_path))
        saved += f" (+ {stats_path.name})"
        eval_env = VecNormalize.load(str(stats_path), eval_env)
        eval_env.training = False
        eval_env.norm_reward = False
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
    """Load a saved model and run it for a few episodes, printing each return."""
    import numpy as np
    import torch
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_ppo_ext import ClippedPPO

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = resolve_settings(args.env, args.hyperparams, args.preset, n_envs=1)
    if args.render:
        settings.env_kwargs.setdefault("render_mode", "human")
    env = make_env(args.env, settings, 1, args.seed)
    stats_path = vecnormalize_path(args.load)
    if stats_path.exists():
        env = VecNormalize.load(str(stats_path), env)
        env.training = False
        env.norm_reward = False
    model = ClippedPPO.load(args.load, env=env, device=_device(args.device, settings.policy))
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


def benchmark(argv: Sequence[str]) -> int:
    """Hand ``argv`` to ``sb3_ppo_ext.benchmark`` (its ``main(argv)``, else ``python -m`` on it)."""
    try:
        package = importlib.import_module("sb3_ppo_ext.benchmark")
    except ImportError as exc:
        print(f"the benchmark subcommand is not available: {exc}", file=sys.stderr)
        return 2
    main_fn = getattr(package, "main", None)
    if callable(main_fn):
        return int(main_fn(list(argv)) or 0)
    if importlib.util.find_spec("sb3_ppo_ext.benchmark.__main__") is None:
        print("the benchmark subcommand is not available in this version of sb3_ppo_ext", file=sys.stderr)
        return 2
    sys.argv = ["python -m sb3_ppo_ext.benchmark", *argv]
    try:
        runpy.run_module("sb3_ppo_ext.benchmark", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


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
        choices=("atari", "mujoco"),
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
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sb3_ppo_ext`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m sb3_ppo_ext",
        description="Train, evaluate and save ClippedPPO agents.",
        epilog="benchmark ARGS...: run the multi-seed benchmark (python -m sb3_ppo_ext benchmark --help)",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,enjoy,benchmark}", required=True)

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

    sub.add_parser("benchmark", help="multi-seed benchmark (delegates to sb3_ppo_ext.benchmark)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sb3_ppo_ext``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "benchmark":
        # everything after the word goes to the benchmark's own parser, --help included
        return benchmark(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
