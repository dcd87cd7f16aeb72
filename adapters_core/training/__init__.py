"""Training: data formats, validation, tokenisation, packing, and the training loop."""
