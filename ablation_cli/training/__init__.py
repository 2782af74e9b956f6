"""The classifier protocol. Importing this package does not import torch."""
