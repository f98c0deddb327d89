"""``python -m sb3_ppo_ext.zoo train|enjoy|...``: an rl_zoo3 script with ClippedPPO registered."""

import sys

from sb3_ppo_ext.zoo.plugin import main

sys.exit(main())
