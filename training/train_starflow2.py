"""Stage training (stages 1-3, LoRA) with accelerate: ``python training/train_starflow2.py --help``.

The code lives in the installed package (``diffusers_starflow2.training.train_starflow2``); this file only runs it.
"""

import sys

from diffusers_starflow2.training.train_starflow2 import cli

if __name__ == "__main__":
    sys.exit(cli())
