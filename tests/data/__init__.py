"""Tests of the data sources in data/."""
