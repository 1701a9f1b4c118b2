"""kdflow domain code: plain Python (no Prefect imports), testable without a server."""
