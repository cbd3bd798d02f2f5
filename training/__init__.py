"""Training-side helpers for STARFlow2: the synthetic shapes world and dataset readers."""
