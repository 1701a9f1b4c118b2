"""Tests of kdflow/teacher/."""
