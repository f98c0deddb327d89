"""A board game with illegal moves: tic-tac-toe against a random opponent, with invalid-action masking.

    python examples/tictactoe_masked.py                    # 30k steps, about two minutes on one core
    python examples/tictactoe_masked.py --timesteps 5000   # or EXAMPLE_TIMESTEPS=5000

Occupied cells are illegal. The env says which moves are legal through ``action_masks()``, the method
sb3-contrib's MaskablePPO reads; ClippedPPO reads it the same way, so the agent never tries an illegal
move, in training or in ``predict(..., action_masks=...)``. Win +1, loss -1, draw 0.
"""

import argparse
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env

from sb3_ppo_ext import ClippedPPO

LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


class TicTacToeEnv(gym.Env):
    """The agent plays X (1) and moves first; the opponent (-1) picks a random legal cell."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (9,), dtype=np.float32)
        self.action_space = spaces.Discrete(9)
        self.board = np.zeros(9, dtype=np.float32)

    def action_masks(self) -> np.ndarray:
        """Legal moves: the empty cells."""
        return self.board == 0

    def _winner(self) -> float:
        for a, b, c in LINES:
            if self.board[a] != 0 and self.board[a] == self.board[b] == self.board[c]:
                return float(self.board[a])
        return 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.board[:] = 0
        return self.board.copy(), {}

    def step(self, action):
        if self.board[action] != 0:
            raise ValueError(f"illegal move {action}: the cell is taken (masking should prevent this)")
        self.board[action] = 1
        if self._winner() == 1:
            return self.board.copy(), 1.0, True, False, {}
        if not (self.board == 0).any():
            return self.board.copy(), 0.0, True, False, {}
        self.board[self.np_random.choice(np.flatnonzero(self.board == 0))] = -1
        if self._winner() == -1:
            return self.board.copy(), -1.0, True, False, {}
        return self.board.copy(), 0.0, not (self.board == 0).any(), False, {}


def play(model: ClippedPPO, games: int, seed: int) -> tuple[int, int, int]:
    """Wins, draws and losses of the deterministic policy against the random opponent."""
    env, results = TicTacToeEnv(), []
    for game in range(games):
        obs, _ = env.reset(seed=seed + game)
        done, reward = False, 0.0
        while not done:
            action, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=True)
            obs, reward, done, _, _ = env.step(int(action))
        results.append(reward)
    return results.count(1.0), results.count(0.0), results.count(-1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 30_000)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = make_vec_env(TicTacToeEnv, n_envs=8, seed=args.seed)
    model = ClippedPPO("MlpPolicy", env, n_steps=64, batch_size=128, learning_rate=1e-3, seed=args.seed)
    before = play(model, 100, seed=10_000)
    model.learn(args.timesteps)
    after = play(model, 100, seed=10_000)
    print(f"against a random opponent, 100 games (wins, draws, losses): before {before}, after {after}")


if __name__ == "__main__":
    main()
