"""Entry point of ``python -m sb3_ppo_ext.benchmark``."""

import sys

from sb3_ppo_ext.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
