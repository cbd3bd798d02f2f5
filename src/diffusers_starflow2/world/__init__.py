"""The synthetic shapes world the embedded default model is trained and evaluated on: the world itself
(``synthetic_world``), its deterministic shape analyser (``shape_analysis``) and the training recipe
(``train_world``). Nothing here is imported by ``diffusers_starflow2`` itself."""
