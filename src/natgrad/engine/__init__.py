"""Training loop, benchmark, checkpoints and distributed helpers (``natgrad.train`` is the entry point)."""
