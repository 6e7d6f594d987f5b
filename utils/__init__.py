"""Support code for the training loop: distributed setup, checkpoints, mixed precision, errors."""
