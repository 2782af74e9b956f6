"""ablate plugins for the tests: one per-matrix and one per-module representation."""
