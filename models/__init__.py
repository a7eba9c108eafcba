"""genret: models."""
