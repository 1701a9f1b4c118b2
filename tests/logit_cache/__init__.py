"""Tests of kdflow/logit_cache/."""
