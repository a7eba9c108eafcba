"""genret: service."""
