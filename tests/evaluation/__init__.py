"""Tests of kdflow/evaluation/."""
