"""Write the dashboards of grafana/mlmon_dashboards/ (one module per dashboard) to grafana/dashboards/<uid>.json.

python grafana/build.py           # regenerate the committed JSON
python grafana/build.py --check   # exit 1 if the committed JSON is not what the code builds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlmon_dashboards import DASHBOARDS, as_json

OUT = Path(__file__).parent / "dashboards"


def render(uid: str) -> str:
    """The file content for ``uid``: sorted keys and a trailing newline, so diffs are stable."""
    return json.dumps(as_json(uid), indent=2, sort_keys=True) + "\n"


def stale() -> list[str]:
    """Files of grafana/dashboards/ that differ from the code, are missing or are extra."""
    expected = {f"{uid}.json": render(uid) for uid in DASHBOARDS}
    present = {path.name for path in OUT.glob("*.json")}
    return sorted(
        name
        for name in expected.keys() | present
        if name not in expected or name not in present or (OUT / name).read_text() != expected[name]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    if parser.parse_args().check:
        differing = stale()
        for name in differing:
            print(f"grafana/dashboards/{name} is out of date: run python grafana/build.py", file=sys.stderr)
        return 1 if differing else 0
    OUT.mkdir(exist_ok=True)
    for uid in DASHBOARDS:
        (OUT / f"{uid}.json").write_text(render(uid))
        print(f"wrote grafana/dashboards/{uid}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
