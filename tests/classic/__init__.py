"""Tests of kdflow/classic/."""
