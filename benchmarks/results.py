"""Where a benchmark's figures go: benchmarks/results/<name>.json (git-ignored), for a closing note to quote."""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, result: dict) -> Path:
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
