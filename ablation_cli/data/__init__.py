"""Dataset sources: everything that turns a dataset name or path into a LoraTable."""
