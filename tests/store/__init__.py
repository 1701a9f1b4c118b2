"""Tests of kdflow/store/."""
