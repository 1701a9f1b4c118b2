"""The run report, comparisons of runs, and the transfer-set sweep's table and verdict."""
