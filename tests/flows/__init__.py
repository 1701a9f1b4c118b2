"""End to end: the flows on real Prefect (a temporary or a started server, a worker), the kdflow command."""
