"""mlmon's Grafana dashboards as code, built with grafana-foundation-sdk.

One module per dashboard (model_overview, training, exporter_health, serving), each
built from the shared helpers of ``panels``; ``DASHBOARDS`` maps each uid to its
function and ``grafana/build.py`` writes them to ``grafana/dashboards/<uid>.json``. The
alert rules (prometheus/rules/mlmon.yml) link to these uids, so they never change.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from .exporter_health import exporter_health
from .model_overview import model_overview
from .serving import serving
from .training import training

DASHBOARDS = {
    "mlmon-model": model_overview,
    "mlmon-training": training,
    "mlmon-exporter": exporter_health,
    "mlmon-serving": serving,
}

#: Fields of Prometheus annotations that the SDK's AnnotationQuery lacks, by annotation name.
ANNOTATION_FIELDS = {
    "New model version": {
        "useValueForTime": True,
        "titleFormat": "{{model}} {{version}}",
        "textFormat": "new version trained",
    }
}


def as_json(uid: str) -> dict:
    """The dashboard ``uid`` as Grafana's JSON model."""
    built = json.loads(JSONEncoder().encode(DASHBOARDS[uid]().build()))
    # Stable panel ids, so that links to a single panel (viewPanel=<id>) keep working.
    for number, panel in enumerate(built["panels"], 1):
        panel["id"] = number
    for annotation in built["annotations"].get("list", []):
        annotation.update(ANNOTATION_FIELDS.get(annotation["name"], {}))
    return built
