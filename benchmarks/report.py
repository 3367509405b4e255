"""Shared output of the benchmark scripts: one JSON object, or aligned `key value` lines."""

from __future__ import annotations

import json


def emit(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
