"""Tests of kdflow/curation/."""
