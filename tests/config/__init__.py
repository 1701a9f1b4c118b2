"""Tests of kdflow/config/."""
