"""Hinton's classic KD of classifiers (digits MLPs, HF sequence classifiers)."""
