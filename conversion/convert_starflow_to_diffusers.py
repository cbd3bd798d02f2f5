"""Convert an original STARFlow (v1) checkpoint to a diffusers folder: ``python conversion/convert_starflow_to_diffusers.py --help``.

The code lives in the installed package (``diffusers_starflow2.conversion.convert_starflow_to_diffusers``); this file only runs it.
"""

import sys

from diffusers_starflow2.conversion.convert_starflow_to_diffusers import main

if __name__ == "__main__":
    sys.exit(main())
