"""Tests of kdflow/models/."""
