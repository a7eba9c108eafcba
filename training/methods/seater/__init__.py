"""SEATER: semantic tree-structured identifiers with contrastive learning (Si et al. 2024)."""
