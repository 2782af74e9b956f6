"""Executors run pending cells: in this process (local) or elsewhere (slurm, later)."""
