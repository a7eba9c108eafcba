"""genret: training."""
