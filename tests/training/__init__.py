"""Tests of kdflow/training/."""
