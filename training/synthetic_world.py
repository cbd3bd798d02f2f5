"""Write the synthetic shapes world: ``python training/synthetic_world.py --help``.

The code lives in the installed package (``diffusers_starflow2.world.synthetic_world``); this file only runs it.
"""

import sys

from diffusers_starflow2.world.synthetic_world import main

if __name__ == "__main__":
    sys.exit(main())
