"""The dashboards' PromQL as Grafana would send it: variables resolved against a real
Prometheus and substituted. Used by tests/integration/test_dashboards.py and grafana/render.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

LABEL_VALUES = re.compile(r"label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)")


@dataclass(frozen=True)
class Query:
    """One query of a dashboard: a panel target or an annotation."""

    panel: dict
    ref: str
    expr: str


def panels(dashboard: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def queries(dashboard: dict) -> list[Query]:
    """The panels' targets and the annotations, in dashboard order."""
    found = [
        Query(panel, target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            found.append(
                Query(
                    {"title": f"annotation {annotation['name']}", "type": "annotation"},
                    "annotation",
                    annotation["expr"],
                )
            )
    return found


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m", interval: str = "15s") -> str:
    """``expr`` with ``$name``/``${name}`` replaced, and Grafana's interval variables."""
    values = {**values, "__rate_interval": rate_interval, "__interval": interval}
    # Longest names first, so that $model_x is not read as $model followed by _x.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    return expr


def resolve_variables(prometheus: str, dashboard: dict, preferred: dict[str, str]) -> dict[str, str]:
    """A value for every variable, in order (a variable may use the ones before it):
    ``label_values`` queries are asked of Prometheus; the preferred value is taken when
    Prometheus offers it, else the first one. Fails when a variable has no value."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable["name"]
        if variable["type"] == "datasource":
            values[name] = "prometheus"
            continue
        options = label_values(prometheus, substitute(variable["query"], values))
        if not options:
            raise LookupError(f"variable {name}: {variable['query']} has no value")
        values[name] = preferred[name] if preferred.get(name) in options else options[0]
    return values


def label_values(prometheus: str, definition: str) -> list[str]:
    """The values of a ``label_values([selector,] label)`` variable query."""
    match = LABEL_VALUES.fullmatch(definition.strip())
    if not match:
        raise ValueError(f"not a label_values() query: {definition}")
    params = {"match[]": match["selector"]} if match["selector"] else {}
    response = httpx.get(f"{prometheus}/api/v1/label/{match['label']}/values", params=params, timeout=10)
    response.raise_for_status()
    return sorted(response.json()["data"])
