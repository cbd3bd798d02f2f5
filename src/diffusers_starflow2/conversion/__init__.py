"""Checkpoint converters and pipeline builders, each a module with ``main(argv) -> exit status``.

- ``convert_starflow_to_diffusers``: an original STARFlow (v1) checkpoint -> a diffusers folder;
- ``make_tiny_starflow2``: a randomly initialised tiny STARFlow2 pipeline folder;
- ``assemble_starflow2``: a STARFlow2 pipeline folder from original component checkpoints.

``starflow2 convert starflow|tiny|assemble ...`` and the scripts under ``conversion/`` of a source checkout run them.
"""
