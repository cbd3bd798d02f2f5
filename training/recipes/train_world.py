"""Train the embedded default model on the shapes world: ``python training/recipes/train_world.py --help``.

The code lives in the installed package (``diffusers_starflow2.world.train_world``); this file only runs it.
"""

import sys

from diffusers_starflow2.world.train_world import main

if __name__ == "__main__":
    sys.exit(main())
