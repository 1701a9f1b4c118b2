"""What every benchmark shares: its options (each a number or a path, with a default) and where its figures go,
benchmarks/results/<name>.json (git-ignored), for a closing note to quote."""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, result: dict) -> Path:
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def options(description: str, **defaults) -> argparse.Namespace:
    """``--name VALUE`` for each default (``max_tokens`` is ``--max-tokens``), typed like its default."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    for name, default in defaults.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=default, help=f"default: {default}"
        )
    return parser.parse_args()
