"""Tests of the benchmarks' own scripts in benchmarks/."""
