"""Recipes: typed sections for every recipe kind, one YAML loader, prompt templates."""
