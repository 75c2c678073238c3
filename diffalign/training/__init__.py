"""The trainer, reference strategies, checkpoints and export."""
