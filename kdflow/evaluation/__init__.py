"""How good a model is (quality) and what it costs to run (deployment)."""
