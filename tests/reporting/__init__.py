"""Tests of kdflow/reporting/."""
