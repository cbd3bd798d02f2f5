"""Write a randomly initialised tiny STARFlow2 pipeline folder: ``python conversion/make_tiny_starflow2.py --help``.

The code lives in the installed package (``diffusers_starflow2.conversion.make_tiny_starflow2``); this file only runs it.
"""

import sys

from diffusers_starflow2.conversion.make_tiny_starflow2 import main

if __name__ == "__main__":
    sys.exit(main())
