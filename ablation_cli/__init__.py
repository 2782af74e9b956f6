"""ablate: crash-proof, resumable ablation grids for weight-space learning on LoRAs."""

__version__ = "0.1.0"
