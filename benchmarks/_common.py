"""What every benchmark script shares: where its result goes and how its output ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def finish(summary: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``summary`` to ``out`` (default ``results/BENCHMARK[-quick].json``, the quick runs
    gitignored) and print it as the output's last line, the one a caller parses."""
    out = out or RESULTS / f"{summary['benchmark']}{'-quick' if summary['quick'] else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return out
