"""Two-phase training, checkpoints, cross-validation and finished-run loading."""
