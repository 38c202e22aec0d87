"""The building blocks every mlmon dashboard is made of: queries on the dashboard's
``datasource`` variable, the panel kinds with mlmon's defaults, the stats that recur
across dashboards, variables and the dashboard frame.

Every query goes to the dashboard's ``datasource`` variable (no ``${DS_...}`` import
inputs), so the same JSON works provisioned or imported, whatever the datasource uid.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, common, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from exporter.config import AlertThresholds

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The shipped default thresholds: the colours' fallback where a model's threshold is switched off.
DEFAULTS = AlertThresholds()
MODEL = 'model="$model"'
MODEL_WINDOW = 'model="$model", window="$window"'
#: The selector of the dashboards whose ``job`` variable picks the scraped service.
JOB = 'job="$job"'


# --- building blocks -----------------------------------------------------------------


def query(
    expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False, fmt: PromQueryFormat | None = None
) -> Dataquery:
    """A Prometheus query on the dashboard's datasource variable."""
    target = Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    target = target.instant() if instant else target.range()
    return target.format(fmt) if fmt else target


def panel(
    builder: Builder, title: str, description: str, unit: str, targets: list[Dataquery], w: int, h: int
) -> Builder:
    """Title, description, unit, size and queries: what every panel must have."""
    return (
        builder.title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(targets)
        .span(w)
        .height(h)
    )


def steps(*pairs: tuple[float | None, str], mode: ThresholdsMode = ThresholdsMode.ABSOLUTE) -> ThresholdsConfig:
    """Colour steps: (value from which the colour applies, colour); the first value is None (base)."""
    return ThresholdsConfig().mode(mode).steps([Threshold(value=v, color=c) for v, c in pairs])


def threshold(name: str) -> str:
    """This model's alert threshold ``name`` (absent where it is switched off)."""
    return f'max by (model) (mlmon_alert_threshold{{{MODEL}, threshold="{name}"}})'


def windowed(metric: str) -> Dataquery:
    """The model's ``metric`` in the selected window, for a stat: one value even when
    several mlmon replicas are scraped (as the alert rules aggregate)."""
    return query(f"max by (model, window) ({metric}{{{MODEL_WINDOW}}})", "value", instant=True)


def newest_version() -> Dataquery:
    """The model's newest trained version, as the legend of an instant query (``mlmon_model_info``)."""
    return query(f"max by (model, version) (mlmon_model_info{{{MODEL}}})", "{{version}}", instant=True)


def last_value() -> common.ReduceDataOptions:
    """Reduce each series to its last non-null value (stats and bar gauges)."""
    return common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def stat_panel(title: str, description: str, unit: str, targets: list[Dataquery], w: int = 3, h: int = 4) -> stat.Panel:
    """A stat of the last value, without sparkline (instant queries)."""
    return (
        panel(stat.Panel(), title, description, unit, targets, w, h)
        .graph_mode(BigValueGraphMode.NONE)
        .color_mode(BigValueColorMode.BACKGROUND)
        .reduce_options(last_value())
        .orientation(VizOrientation.AUTO)
    )


def plain_stat(title: str, description: str, unit: str, target: Dataquery, w: int) -> stat.Panel:
    """A stat of one instant query's last value, uncoloured: a fact, not a judgement."""
    return stat_panel(title, description, unit, [target], w=w).color_mode(BigValueColorMode.NONE)


def name_stat(title: str, description: str, target: Dataquery, w: int) -> stat.Panel:
    """A stat that shows the series' legend (e.g. a version label) instead of its value."""
    return plain_stat(title, description, "none", target, w).text_mode(BigValueTextMode.NAME)


def up_stat(title: str, description: str, target: Dataquery, w: int) -> stat.Panel:
    """A 0/1 health gauge (``up``, ``mlmon_source_up``...) shown as "down" in red or "up" in green."""
    up_mapping = ValueMap(
        {"0": ValueMappingResult(text="down", color="red"), "1": ValueMappingResult(text="up", color="green")}
    )
    return (
        stat_panel(title, description, "none", [target], w=w)
        .mappings([up_mapping])
        .thresholds(steps((None, "red"), (1, "green")))
    )


def judged_stat(
    title: str,
    description: str,
    unit: str,
    value: Dataquery,
    limits: dict[str, str],
    scale: tuple[float, float],
    w: int = 3,
) -> stat.Panel:
    """A stat coloured by the model's own alert thresholds.

    Grafana's thresholds are static numbers, but ``mlmon_alert_threshold`` differs per
    model. So the colour steps are percentages of the field's min..max range (red below
    0 % or from 100 %), and ``limits`` (``"min"``/``"max"`` -> threshold query) set that
    range from the model's thresholds through "Config from query results"
    transformations, which also drop those queries from the display. ``scale`` is the
    static min..max that applies where a threshold is switched off.
    """
    targets, transformations = [value], []
    # At most two limits ("min", "max"), one query ref each.
    for ref, (handler, expr) in zip("BC", limits.items(), strict=False):
        targets.append(query(expr, handler, ref, instant=True))
        transformations.append(
            DataTransformerConfig(
                id_val="configFromData",
                options={"configRefId": ref, "mappings": [{"fieldName": handler, "handlerKey": handler}]},
            )
        )
    colours = [(None, "red"), (0, "green")] if "min" in limits else [(None, "green")]
    if "max" in limits:
        colours.append((100, "red"))
    return (
        stat_panel(title, description, unit, targets, w)
        .min(scale[0])
        .max(scale[1])
        .thresholds(steps(*colours, mode=ThresholdsMode.PERCENTAGE))
        .transformations(transformations)
    )


def timeseries_panel(
    title: str, description: str, unit: str, targets: list[Dataquery], w: int = 12, h: int = 8
) -> timeseries.Panel:
    """Lines over time with a legend below and a tooltip listing every series, largest first."""
    legend = (
        common.VizLegendOptions()
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs([])
    )
    tooltip = common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
    return (
        panel(timeseries.Panel(), title, description, unit, targets, w, h)
        .legend(legend)
        .tooltip(tooltip)
        .line_width(1)
        .fill_opacity(10)
    )


def table_panel(title: str, description: str, unit: str, targets: list[Dataquery], w: int, h: int) -> table.Panel:
    """A table of the first frame (after transformations), with a header."""
    return (
        panel(table.Panel(), title, description, unit, targets, w, h)
        .frame_index(0)
        .show_header(True)
        .align("auto")
        .inspect(False)
    )


def bargauge_panel(
    title: str, description: str, unit: str, targets: list[Dataquery], w: int = 8, h: int = 9
) -> bargauge.Panel:
    """Horizontal bars, one per series, each at its last value."""
    return (
        panel(bargauge.Panel(), title, description, unit, targets, w, h)
        .orientation(VizOrientation.HORIZONTAL)
        .reduce_options(last_value())
    )


def process_cpu(title: str, description: str) -> timeseries.Panel:
    """CPU time per second of each process of ``$job``, from the standard process collector
    (``process_cpu_seconds_total``); 100 % is one core."""
    return timeseries_panel(
        title,
        description,
        "percentunit",
        [query(f"rate(process_cpu_seconds_total{{{JOB}}}[$__rate_interval])", "{{instance}}")],
        w=8,
    )


def process_memory(title: str, description: str) -> timeseries.Panel:
    """Resident memory of each process of ``$job`` (``process_resident_memory_bytes``)."""
    return timeseries_panel(
        title, description, "bytes", [query(f"process_resident_memory_bytes{{{JOB}}}", "{{instance}}")], w=8
    )


def variable(name: str, label: str, definition: str, description: str, multi: bool = False) -> QueryVariable:
    """A query variable that re-reads its values when the time range changes."""
    built = (
        QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(definition)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    return built.multi(True).include_all(True).all_value(".*") if multi else built


def datasource_variable() -> DatasourceVariable:
    """The ``datasource`` variable every query of every mlmon dashboard goes to."""
    return (
        DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus that scrapes mlmon.")
        .type("prometheus")
    )


def model_variable(multi: bool = False) -> QueryVariable:
    """The ``model`` variable: one model, or several (``multi``, with "All" as ``.*``)."""
    # mlmon_alert_threshold exists for every configured model and every model with
    # training runs, so both kinds of model are listed.
    return variable(
        "model", "Model", "label_values(mlmon_alert_threshold, model)", "Model name, as in mlmon's config.", multi
    )


def dashboard(uid: str, title: str, description: str, time_from: str) -> Dashboard:
    """A dashboard linked to the other mlmon dashboards (same model and time range)."""
    links = (
        DashboardLink("mlmon")
        .type(DashboardLinkType.DASHBOARDS)
        .tags(["mlmon"])
        .as_dropdown(True)
        .include_vars(True)
        .keep_time(True)
    )
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["mlmon"])
        .time(time_from, "now")
        .refresh("1m")
        .timezone("utc")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .link(links)
        .with_variable(datasource_variable())
    )
