"""The synthetic shapes world the embedded default model is trained and evaluated on: the world itself
(``synthetic_world``), its deterministic shape analyser (``shape_analysis``) and the training recipe
(``train_world``). An example built on the installed package (run from ``examples/``: ``python -m shapes_world.train_world``); the package ships only the model it trained."""
