"""genret: training/commands."""
