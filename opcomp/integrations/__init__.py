"""Adapters for training frameworks that own the loop: each imports its framework when imported."""
