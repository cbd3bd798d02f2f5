"""Stage training (``train_starflow2``) and its datasets (``data``); not imported by ``diffusers_starflow2`` itself."""
