"""The Prefect flows: thin, each read top to bottom (flows/distill.py is the whole pipeline)."""

import os

# Without PREFECT_API_URL a flow starts Prefect's temporary local server and gives it 20 s to answer; a loaded
# 2-core machine has been seen to need minutes, and the flow then ends in Prefect's own traceback before any stage.
# Prefect reads its settings once, when it is imported, so the longer default is set here, before any flow module
# imports Prefect (`kdflow ...`, `python -m flows.<stage>`, `from flows.distill import distill`). A value set wins.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(STARTUP_TIMEOUT_ENV, "600")
