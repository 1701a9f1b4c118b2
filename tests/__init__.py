"""The test suite: one folder per wing of kdflow/ (and data/, benchmarks/), tasks/ for the Prefect glue, flows/
end to end; shared setup (conftest.py, fault_proxy.py, the miniature recipes) here. A package, so that a test
module imports another's helpers as tests.<folder>.<module> whichever folder pytest is given."""
