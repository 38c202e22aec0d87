"""mlmon's Grafana dashboards as code, built with grafana-foundation-sdk.

One function per dashboard; ``DASHBOARDS`` maps each uid to its function and
``grafana/build.py`` writes them to ``grafana/dashboards/<uid>.json``. The alert rules
(prometheus/rules/mlmon.yml) link to these uids, so they never change.

Every query goes to the dashboard's ``datasource`` variable (no ``${DS_...}`` import
inputs), so the same JSON works provisioned or imported, whatever the datasource uid.
"""

from __future__ import annotations

import json
import math

from grafana_foundation_sdk.builders import bargauge, common, heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
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
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from exporter.config import AlertThresholds

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The shipped default thresholds: the colours' fallback where a model's threshold is switched off.
DEFAULTS = AlertThresholds()
MODEL = 'model="$model"'
MODEL_WINDOW = 'model="$model", window="$window"'


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


#: The online log loss at which MlmonOnlineAccuracyDegraded's log-loss conditions fire:
#: online_logloss_max, or online_logloss_vs_offline_ratio_max times the serving
#: version's validation log loss (online / ratio), whichever is lower.
LOGLOSS_LIMIT = (
    f"min by (model) ("
    f"(mlmon_online_logloss{{{MODEL_WINDOW}}} / mlmon_online_logloss_vs_offline_ratio{{{MODEL_WINDOW}}})"
    f" * on (model) group_left {threshold('online_logloss_vs_offline_ratio_max')}"
    f" or {threshold('online_logloss_max')})"
)


def stat_panel(title: str, description: str, unit: str, targets: list[Dataquery], w: int = 3, h: int = 4) -> stat.Panel:
    """A stat of the last value, without sparkline (instant queries)."""
    reduce = common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    return (
        panel(stat.Panel(), title, description, unit, targets, w, h)
        .graph_mode(BigValueGraphMode.NONE)
        .color_mode(BigValueColorMode.BACKGROUND)
        .reduce_options(reduce)
        .orientation(VizOrientation.AUTO)
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
    for ref, (handler, expr) in zip("BC", limits.items()):
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
    reduce = common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    return (
        panel(bargauge.Panel(), title, description, unit, targets, w, h)
        .orientation(VizOrientation.HORIZONTAL)
        .reduce_options(reduce)
    )


#: The field of a by-version panel's trained-time query after the merge (see by_version_panel).
TRAINED_FIELD = "Value #B"


def by_version_panel(title: str, description: str, unit: str, metric: str) -> bargauge.Panel:
    """One bar per recent version of the model, in training order, oldest at the top.

    Grafana keeps Prometheus' series order, which sorts label values as text (v10, v11,
    v3, ...). So the instant values of ``metric`` (A) are merged by version with each
    version's training time (``mlmon_version_trained_timestamp_seconds``, B), sorted by
    it, and B is then hidden; the bar gauge shows every row ("All values"), named by the
    one text field left, the version.
    """
    targets = [
        query(f"max by (model, version) ({metric}{{{MODEL}}})", "{{version}}", instant=True, fmt=PromQueryFormat.TABLE),
        query(
            f"max by (model, version) (mlmon_version_trained_timestamp_seconds{{{MODEL}}})",
            "{{version}}",
            "B",
            instant=True,
            fmt=PromQueryFormat.TABLE,
        ),
    ]
    reduce = common.ReduceDataOptions().values(True).calcs([]).fields("/^Value #A$/")
    return (
        panel(bargauge.Panel(), title, description + " Oldest version at the top.", unit, targets, 8, 9)
        .orientation(VizOrientation.HORIZONTAL)
        .reduce_options(reduce)
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            DataTransformerConfig(id_val="sortBy", options={"fields": {}, "sort": [{"field": TRAINED_FIELD}]})
        )
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "model": True, TRAINED_FIELD: True}},
            )
        )
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
    return (
        DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus that scrapes mlmon.")
        .type("prometheus")
    )


def model_variable(multi: bool = False) -> QueryVariable:
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


# --- dashboards ------------------------------------------------------------------------


def model_overview() -> Dashboard:
    """What the production model predicts, how accurate it is once labels arrive, and
    whether predictions still arrive."""
    ratio = "percentunit"
    return (
        dashboard(
            "mlmon-model",
            "mlmon / Model overview",
            "One model in production: predictions, online accuracy, calibration, label coverage, reproducibility, freshness and its alerts.",
            "now-24h",
        )
        .with_variable(model_variable())
        .with_variable(
            variable(
                "window",
                "Window",
                f"label_values(mlmon_window_predictions{{{MODEL}}}, window)",
                "Window of the statistics (config `windows`).",
            )
        )
        .annotation(
            AnnotationQuery()
            .name("New model version")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("blue")
            # The value is the newest version's training time (ms): with useValueForTime
            # (set in as_json, the SDK lacks it) the marker sits at the training time.
            # Matched per target, so that two mlmon replicas or a rollout between them
            # cannot make the match ambiguous.
            .expr(
                f"max by (model, version) (mlmon_model_info{{{MODEL}}}"
                f" * on (model, instance, job) group_left mlmon_model_trained_timestamp_seconds{{{MODEL}}}) * 1000"
            )
        )
        .with_panel(
            stat_panel(
                "Version",
                "Newest trained version of the model (`mlmon_model_info`).",
                "none",
                [query(f"max by (model, version) (mlmon_model_info{{{MODEL}}})", "{{version}}", instant=True)],
                w=3,
            )
            .text_mode(BigValueTextMode.NAME)
            .color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            stat_panel(
                "Trained at",
                "Training time of the newest version (`mlmon_model_trained_timestamp_seconds`), UTC.",
                "dateTimeAsIso",
                [
                    query(
                        f"max by (model) (mlmon_model_trained_timestamp_seconds{{{MODEL}}}) * 1000",
                        "trained",
                        instant=True,
                    )
                ],
                w=3,
            ).color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            judged_stat(
                "Online log loss",
                "Log loss of the labeled predictions of the label-delayed window (`mlmon_online_logloss`). Red at or above this model's "
                "`online_logloss_max` threshold (`mlmon_alert_threshold`, off by default) or, where the serving version's offline log loss is known, "
                "at `online_logloss_vs_offline_ratio_max` times it, whichever is lower (the two log-loss conditions of MlmonOnlineAccuracyDegraded, "
                "which also needs enough labels). With neither threshold: red at ln 2, the log loss of always predicting 0.5.",
                "none",
                windowed("mlmon_online_logloss"),
                {"max": LOGLOSS_LIMIT},
                (0, math.log(2)),
            )
        )
        .with_panel(
            judged_stat(
                "Online ROC AUC",
                "ROC AUC of the labeled predictions of the label-delayed window (`mlmon_online_roc_auc`); absent with one class only. "
                "Red below this model's `online_roc_auc_min` threshold (`mlmon_alert_threshold`, off by default); without it, red below 0.5 (random).",
                "none",
                windowed("mlmon_online_roc_auc"),
                {"min": threshold("online_roc_auc_min")},
                (0.5, 1),
            )
        )
        .with_panel(
            judged_stat(
                "Calibration",
                "Mean predicted probability over the observed positive rate (`mlmon_online_calibration_ratio`): 1 is calibrated, above 1 over-predicts. "
                f"Red outside this model's `calibration_ratio_min`..`calibration_ratio_max` (`mlmon_alert_threshold`; defaults {DEFAULTS.calibration_ratio_min}..{DEFAULTS.calibration_ratio_max}).",
                "none",
                windowed("mlmon_online_calibration_ratio"),
                {"min": threshold("calibration_ratio_min"), "max": threshold("calibration_ratio_max")},
                (DEFAULTS.calibration_ratio_min, DEFAULTS.calibration_ratio_max),
            )
        )
        .with_panel(
            judged_stat(
                "Label coverage",
                "Share of the label-delayed window's predictions with a label row (`mlmon_online_label_coverage_ratio`); with labels stored only for "
                "positives it is about the positive rate. Red below this model's `label_coverage_ratio_min` (`mlmon_alert_threshold`, off by default).",
                ratio,
                windowed("mlmon_online_label_coverage_ratio"),
                {"min": threshold("label_coverage_ratio_min")},
                (0, 1),
            )
        )
        .with_panel(
            judged_stat(
                "Reproducibility",
                "Share of replayed predictions whose offline score matches the served one (`mlmon_replay_reproducibility_ratio`); below 1 means "
                f"training/serving skew. Red below this model's `reproducibility_ratio_min` (`mlmon_alert_threshold`; default {DEFAULTS.reproducibility_ratio_min}).",
                ratio,
                windowed("mlmon_replay_reproducibility_ratio"),
                {"min": threshold("reproducibility_ratio_min")},
                (DEFAULTS.reproducibility_ratio_min, 1),
            )
        )
        .with_panel(
            judged_stat(
                "Mode share",
                "Share of the window's predictions that have the most frequent score (`mlmon_prediction_mode_share_ratio`); near 1 means stuck "
                f"predictions. Red at or above this model's `mode_share_ratio_max` (`mlmon_alert_threshold`; default {DEFAULTS.mode_share_ratio_max}).",
                ratio,
                windowed("mlmon_prediction_mode_share_ratio"),
                {"max": threshold("mode_share_ratio_max")},
                (0, DEFAULTS.mode_share_ratio_max),
            )
        )
        .with_panel(
            timeseries_panel(
                "Prediction score: mean and percentiles",
                "Mean (`mlmon_prediction_score_mean`) and percentiles (`mlmon_prediction_score_percentile`) of the scores of the window, as mlmon computed them at each scrape.",
                ratio,
                [
                    query(f"mlmon_prediction_score_mean{{{MODEL_WINDOW}}}", "mean"),
                    query(f"mlmon_prediction_score_percentile{{{MODEL_WINDOW}}}", "p{{percentile}}", "B"),
                ],
            )
        )
        .with_panel(
            panel(
                heatmap.Panel(),
                "Prediction score distribution",
                "Predictions per second in each score bucket of the histogram `mlmon_prediction_score` (all predictions counted since mlmon started, not windowed).",
                "reqps",
                [
                    query(
                        f"sum by (le) (rate(mlmon_prediction_score_bucket{{{MODEL}}}[$__rate_interval]))",
                        "{{le}}",
                        fmt=PromQueryFormat.HEATMAP,
                    )
                ],
                12,
                8,
            )
            .calculate(False)
            .y_axis(heatmap.YAxisConfig().unit(ratio).axis_label("score"))
            .color(
                heatmap.HeatmapColorOptions()
                .mode(HeatmapColorMode.SCHEME)
                .scheme("Oranges")
                .scale(HeatmapColorScale.EXPONENTIAL)
                .exponent(0.5)
                .steps(64)
                .fill("dark-orange")
            )
            .cell_values(heatmap.CellValues().unit("reqps"))
        )
        .with_panel(
            timeseries_panel(
                "Online vs offline log loss",
                "Online log loss of the label-delayed window (`mlmon_online_logloss`), the validation log loss of the version that served it "
                "(online / `mlmon_online_logloss_vs_offline_ratio`) and that of the newest trained version (`mlmon_offline_logloss`).",
                "none",
                [
                    query(f"mlmon_online_logloss{{{MODEL_WINDOW}}}", "online"),
                    query(
                        f"mlmon_online_logloss{{{MODEL_WINDOW}}} / mlmon_online_logloss_vs_offline_ratio{{{MODEL_WINDOW}}}",
                        "offline (serving version)",
                        "B",
                    ),
                    query(f"mlmon_offline_logloss{{{MODEL}}}", "offline (newest version)", "C"),
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Labeled predictions",
                "Predictions of the label-delayed window (`mlmon_online_predictions`), those with a usable label (`mlmon_online_labeled_predictions`) "
                "and positive labels (`mlmon_online_positive_labels`); online accuracy alerts need `online_labeled_predictions_min` and `online_positive_labels_min`.",
                "short",
                [
                    query(f"mlmon_online_predictions{{{MODEL_WINDOW}}}", "predictions"),
                    query(f"mlmon_online_labeled_predictions{{{MODEL_WINDOW}}}", "labeled", "B"),
                    query(f"mlmon_online_positive_labels{{{MODEL_WINDOW}}}", "positive", "C"),
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Calibration over time",
                "Calibration ratio of the label-delayed window (`mlmon_online_calibration_ratio`) and this model's `calibration_ratio_min`/`_max` "
                "thresholds, outside which MlmonCalibrationOff fires.",
                "none",
                [
                    query(f"mlmon_online_calibration_ratio{{{MODEL_WINDOW}}}", "calibration"),
                    query(threshold("calibration_ratio_min"), "min", "B"),
                    query(threshold("calibration_ratio_max"), "max", "C"),
                ],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Reproducibility, label coverage and mode share",
                "The ratios of the stats above over time (`mlmon_replay_reproducibility_ratio`, `mlmon_online_label_coverage_ratio`, "
                "`mlmon_prediction_mode_share_ratio`), to tell a lasting incident from noise.",
                ratio,
                [
                    query(f"mlmon_replay_reproducibility_ratio{{{MODEL_WINDOW}}}", "reproducibility"),
                    query(f"mlmon_online_label_coverage_ratio{{{MODEL_WINDOW}}}", "label coverage", "B"),
                    query(f"mlmon_prediction_mode_share_ratio{{{MODEL_WINDOW}}}", "mode share", "C"),
                ],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Freshness: age of the newest prediction",
                "Seconds since the newest prediction in the store (`time() - mlmon_prediction_last_timestamp_seconds`) and this model's "
                "`prediction_age_seconds_max` threshold, above which MlmonPredictionsUnavailable fires.",
                "s",
                [
                    query(f"time() - max by (model) (mlmon_prediction_last_timestamp_seconds{{{MODEL}}})", "age"),
                    query(threshold("prediction_age_seconds_max"), "threshold", "B"),
                ],
                w=8,
            )
        )
        .with_panel(
            table_panel(
                "Firing mlmon alerts",
                "mlmon alerts firing now for this model, and those without a model (exporter down, state database), from Prometheus' `ALERTS` series.",
                "none",
                [
                    query(
                        'ALERTS{alertstate="firing", alertname=~"Mlmon.*", model=~"$model|"}',
                        instant=True,
                        fmt=PromQueryFormat.TABLE,
                    )
                ],
                24,
                6,
            ).with_transformation(
                DataTransformerConfig(
                    id_val="organize",
                    options={"excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True}},
                )
            )
        )
    )


def training() -> Dashboard:
    """Training runs by version: did the data shrink, did offline accuracy worsen, did a
    feature's distribution change?"""
    return (
        dashboard(
            "mlmon-training",
            "mlmon / Training",
            "Training runs of one model by version: rows, validation log loss and ROC AUC, change ratios, and the newest version's feature breakdown.",
            "now-24h",
        )
        .with_variable(model_variable())
        .with_panel(
            stat_panel(
                "Newest version",
                "Newest trained version (`mlmon_model_info`).",
                "none",
                [query(f"max by (model, version) (mlmon_model_info{{{MODEL}}})", "{{version}}", instant=True)],
                w=4,
            )
            .text_mode(BigValueTextMode.NAME)
            .color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            stat_panel(
                "Training rows",
                "Training rows of the newest version (`mlmon_training_rows`).",
                "short",
                [query(f"max by (model) (mlmon_training_rows{{{MODEL}}})", "rows", instant=True)],
                w=6,
            ).color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            judged_stat(
                "Training rows vs baseline",
                "Training rows of the newest version over the previous version's and over those of the version trained about 30 days before it "
                f"(`mlmon_training_rows_change_ratio`). Red below this model's `training_rows_change_ratio_min` (`mlmon_alert_threshold`; default {DEFAULTS.training_rows_change_ratio_min}).",
                "none",
                query(
                    f"max by (model, baseline) (mlmon_training_rows_change_ratio{{{MODEL}}})",
                    "{{baseline}}",
                    instant=True,
                ),
                {"min": threshold("training_rows_change_ratio_min")},
                (DEFAULTS.training_rows_change_ratio_min, 1),
                w=6,
            ).text_mode(BigValueTextMode.VALUE_AND_NAME)
        )
        .with_panel(
            judged_stat(
                "Validation log loss vs previous version",
                "Validation log loss of the newest version over the previous one's (`mlmon_offline_logloss_change_ratio`); above 1 is worse. "
                f"Red at or above this model's `offline_logloss_change_ratio_max` (`mlmon_alert_threshold`; default {DEFAULTS.offline_logloss_change_ratio_max}).",
                "none",
                query(
                    f'max by (model) (mlmon_offline_logloss_change_ratio{{{MODEL}, baseline="previous_version"}})',
                    "value",
                    instant=True,
                ),
                {"max": threshold("offline_logloss_change_ratio_max")},
                (0, DEFAULTS.offline_logloss_change_ratio_max),
                w=4,
            )
        )
        .with_panel(
            judged_stat(
                "Validation ROC AUC vs previous version",
                "Validation ROC AUC of the newest version over the previous one's (`mlmon_offline_roc_auc_change_ratio`); below 1 is worse. "
                f"Red below this model's `offline_roc_auc_change_ratio_min` (`mlmon_alert_threshold`; default {DEFAULTS.offline_roc_auc_change_ratio_min}).",
                "none",
                query(
                    f'max by (model) (mlmon_offline_roc_auc_change_ratio{{{MODEL}, baseline="previous_version"}})',
                    "value",
                    instant=True,
                ),
                {"min": threshold("offline_roc_auc_change_ratio_min")},
                (DEFAULTS.offline_roc_auc_change_ratio_min, 1),
                w=4,
            )
        )
        .with_panel(
            by_version_panel(
                "Training rows by version",
                "Training rows of each recent version (`mlmon_version_training_rows`): a version trained on fewer rows stands out.",
                "short",
                "mlmon_version_training_rows",
            )
        )
        .with_panel(
            by_version_panel(
                "Validation log loss by version",
                "Validation log loss of each recent version (`mlmon_version_offline_logloss`); lower is better.",
                "none",
                "mlmon_version_offline_logloss",
            ).decimals(4)
        )
        .with_panel(
            by_version_panel(
                "Validation ROC AUC by version",
                "Validation ROC AUC of each recent version (`mlmon_version_offline_roc_auc`); higher is better.",
                "none",
                "mlmon_version_offline_roc_auc",
            ).decimals(4)
        )
        .with_panel(
            bargauge_panel(
                "Feature PSI, newest vs previous version",
                "Population stability index of each feature between the previous and the newest version's training data (`mlmon_training_feature_psi`). "
                "Usual reading: below 0.1 stable (green), 0.1-0.25 moderate (orange), above 0.25 a large shift (red).",
                "none",
                [query(f"mlmon_training_feature_psi{{{MODEL}}}", "{{feature}}", instant=True)],
            )
            .decimals(3)
            .thresholds(steps((None, "green"), (0.1, "orange"), (0.25, "red")))
        )
        .with_panel(
            bargauge_panel(
                "Category shares, newest version",
                "Share of each top category of each categorical feature in the newest version's training data (`mlmon_training_feature_category_share_ratio`); "
                "`__other__` is the rest. A vanished category shows as a missing bar, a merged one as a grown bar.",
                "percentunit",
                [
                    query(
                        f"mlmon_training_feature_category_share_ratio{{{MODEL}}}",
                        "{{feature}}={{category}}",
                        instant=True,
                    )
                ],
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            table_panel(
                "Feature breakdown, newest version",
                "Per feature of the newest version: share of missing values, 0-1 (`mlmon_training_feature_missing_ratio`), mean of numeric features "
                "(`mlmon_training_feature_mean`) and PSI against the previous version (`mlmon_training_feature_psi`).",
                "none",
                [
                    query(f"mlmon_training_feature_missing_ratio{{{MODEL}}}", instant=True, fmt=PromQueryFormat.TABLE),
                    query(f"mlmon_training_feature_mean{{{MODEL}}}", ref="B", instant=True, fmt=PromQueryFormat.TABLE),
                    query(f"mlmon_training_feature_psi{{{MODEL}}}", ref="C", instant=True, fmt=PromQueryFormat.TABLE),
                ],
                8,
                9,
            )
            .with_transformation(DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(
                DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True, "__name__": True, "instance": True, "job": True, "model": True},
                        "renameByName": {"Value #A": "missing", "Value #B": "mean", "Value #C": "PSI"},
                    },
                )
            )
            .decimals(3)
        )
    )


def exporter_health() -> Dashboard:
    """Is mlmon itself healthy: sources up, refresh times and errors, scrapes, resources."""
    job = 'job="$job"'
    models = 'job="$job", model=~"$model"'
    up_mapping = ValueMap(
        {"0": ValueMappingResult(text="down", color="red"), "1": ValueMappingResult(text="up", color="green")}
    )
    return (
        dashboard(
            "mlmon-exporter",
            "mlmon / Exporter health",
            "mlmon itself: whether its sources refresh, how long refreshes take, errors by reason, scrapes and process resources.",
            "now-6h",
        )
        .with_variable(
            variable("job", "Job", "label_values(mlmon_build_info, job)", "Prometheus job that scrapes mlmon.")
        )
        .with_variable(model_variable(multi=True))
        .with_panel(
            stat_panel(
                "Exporter up",
                "Whether Prometheus scrapes each mlmon target (`up`).",
                "none",
                [query(f"up{{{job}}}", "{{instance}}", instant=True)],
                w=4,
            )
            .mappings([up_mapping])
            .thresholds(steps((None, "red"), (1, "green")))
        )
        .with_panel(
            stat_panel(
                "State database up",
                "Whether mlmon's last read of its state database (training runs) succeeded (`mlmon_state_up`).",
                "none",
                [query(f"mlmon_state_up{{{job}}}", "{{instance}}", instant=True)],
                w=4,
            )
            .mappings([up_mapping])
            .thresholds(steps((None, "red"), (1, "green")))
        )
        .with_panel(
            stat_panel(
                "mlmon version",
                "Build of each mlmon target (`mlmon_build_info`).",
                "none",
                [query(f"mlmon_build_info{{{job}}}", "{{version}}", instant=True)],
                w=4,
            )
            .text_mode(BigValueTextMode.NAME)
            .color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            stat_panel(
                "Sources up",
                "Whether the last refresh of each model's source succeeded (`mlmon_source_up`); a failed source keeps its last values for the staleness period.",
                "none",
                [query(f"mlmon_source_up{{{models}}}", "{{model}} {{source}}", instant=True)],
                w=12,
            )
            .mappings([up_mapping])
            .thresholds(steps((None, "red"), (1, "green")))
            .text_mode(BigValueTextMode.VALUE_AND_NAME)
        )
        .with_panel(
            timeseries_panel(
                "Refresh duration",
                "Wall time of each model's last refresh, all sources (`mlmon_refresh_duration_seconds`).",
                "s",
                [query(f"mlmon_refresh_duration_seconds{{{models}}}", "{{model}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Refresh errors by reason",
                "Failed source refreshes per second of the selected models by reason (`mlmon_refresh_errors_total`), and failed reads of the state database "
                "(`mlmon_state_errors_total`). Reasons: timeout, connection, schema (missing table or column), query, internal.",
                "ops",
                [
                    query(
                        f"sum by (reason) (rate(mlmon_refresh_errors_total{{{models}}}[$__rate_interval]))",
                        "sources {{reason}}",
                    ),
                    query(
                        f"sum by (reason) (rate(mlmon_state_errors_total{{{job}}}[$__rate_interval]))",
                        "state {{reason}}",
                        "B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Age of the last successful refresh",
                "Seconds since each model's last refresh in which every source succeeded (`time() - mlmon_refresh_last_success_timestamp_seconds`); it grows while a source fails.",
                "s",
                [query(f"time() - mlmon_refresh_last_success_timestamp_seconds{{{models}}}", "{{model}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Scrape duration",
                "How long Prometheus takes to scrape mlmon (`scrape_duration_seconds`); a scrape reads mlmon's snapshot, never a database.",
                "s",
                [query(f"scrape_duration_seconds{{{job}}}", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Process memory",
                "Resident memory of the mlmon process (`process_resident_memory_bytes`); it must not grow with the store's row count.",
                "bytes",
                [query(f"process_resident_memory_bytes{{{job}}}", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Process CPU",
                "CPU time of the mlmon process per second (`rate(process_cpu_seconds_total)`); 100 % is one core.",
                "percentunit",
                [query(f"rate(process_cpu_seconds_total{{{job}}}[$__rate_interval])", "{{instance}}")],
                w=8,
            )
        )
    )


def serving() -> Dashboard:
    """The model server's side, from prometheus-fastapi-instrumentator's standard metrics,
    the process collector and the server's prediction-cache counters."""
    job = 'job="$job"'
    requests = f"sum(rate(http_requests_total{{{job}}}[$__rate_interval]))"
    hits = f"sum(rate(model_server_cache_hits_total{{{job}}}[$__rate_interval]))"
    misses = f"sum(rate(model_server_cache_misses_total{{{job}}}[$__rate_interval]))"
    return (
        dashboard(
            "mlmon-serving",
            "mlmon / Serving system",
            "The model server that teams watch next to the model: traffic, errors, latency, resources and the prediction cache.",
            "now-6h",
        )
        .with_variable(
            variable(
                "job",
                "Job",
                "label_values(http_requests_total, job)",
                "Prometheus job of the model server (instrumented with prometheus-fastapi-instrumentator).",
            )
        )
        .with_panel(
            stat_panel(
                "Instances up",
                "Targets of the job that Prometheus scrapes successfully (`up`).",
                "short",
                [query(f"sum(up{{{job}}})", "up", instant=True)],
                w=6,
            ).color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            stat_panel(
                "Request rate",
                "Requests per second, all handlers (`http_requests_total`).",
                "reqps",
                [query(requests, "requests", instant=True)],
                w=6,
            ).color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            stat_panel(
                "Error ratio",
                "Share of requests answered with a 5xx status (`http_requests_total`).",
                "percentunit",
                [
                    query(
                        f'sum(rate(http_requests_total{{{job}, status=~"5.."}}[$__rate_interval])) / {requests}',
                        "errors",
                        instant=True,
                    )
                ],
                w=6,
            ).thresholds(steps((None, "green"), (0.01, "red")))
        )
        .with_panel(
            stat_panel(
                "Prediction cache hit ratio",
                "Share of predictions answered from the server's cache (`model_server_cache_hits_total` / (hits + `model_server_cache_misses_total`)).",
                "percentunit",
                [query(f"{hits} / ({hits} + {misses})", "hit ratio", instant=True)],
                w=6,
            ).color_mode(BigValueColorMode.NONE)
        )
        .with_panel(
            timeseries_panel(
                "Requests by handler and status",
                "Requests per second by handler and status class (`http_requests_total`).",
                "reqps",
                [
                    query(
                        f"sum by (handler, status) (rate(http_requests_total{{{job}}}[$__rate_interval]))",
                        "{{handler}} {{status}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Error ratio by handler",
                "Share of each handler's requests answered with a 5xx status (`http_requests_total`).",
                "percentunit",
                [
                    query(
                        f'sum by (handler) (rate(http_requests_total{{{job}, status=~"5.."}}[$__rate_interval])) / sum by (handler) (rate(http_requests_total{{{job}}}[$__rate_interval]))',
                        "{{handler}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Latency percentiles",
                "Request latency percentiles of all handlers, from the fine-bucketed histogram `http_request_duration_highr_seconds`.",
                "s",
                [
                    query(
                        f"histogram_quantile({q}, sum by (le) (rate(http_request_duration_highr_seconds_bucket{{{job}}}[$__rate_interval])))",
                        f"p{round(q * 100)}",
                        ref,
                    )
                    for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "p95 latency by handler",
                "95th percentile latency per handler from `http_request_duration_seconds`, whose buckets run from 1 ms to 2.5 s "
                "(the model server sets them: the instrumentator's default 0.1/0.5/1 s would read ~95 ms for any latency under 100 ms).",
                "s",
                [
                    query(
                        f"histogram_quantile(0.95, sum by (handler, le) (rate(http_request_duration_seconds_bucket{{{job}}}[$__rate_interval])))",
                        "{{handler}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "CPU",
                "CPU time of each server process per second (`rate(process_cpu_seconds_total)`); 100 % is one core.",
                "percentunit",
                [query(f"rate(process_cpu_seconds_total{{{job}}}[$__rate_interval])", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Memory",
                "Resident memory of each server process (`process_resident_memory_bytes`).",
                "bytes",
                [query(f"process_resident_memory_bytes{{{job}}}", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prediction cache",
                "Prediction-cache hits and misses per second (`model_server_cache_hits_total`, `model_server_cache_misses_total`).",
                "ops",
                [query(hits, "hits"), query(misses, "misses", "B")],
                w=8,
            )
        )
    )


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
