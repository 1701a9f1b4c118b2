"""The stages' Prefect glue in tasks/: stage keys, cached results, artifacts."""
