"""The model overview dashboard (uid mlmon-model): what the production model predicts,
how accurate it is once labels arrive, and whether predictions still arrive."""

from __future__ import annotations

import math

from grafana_foundation_sdk.builders import heatmap, table
from grafana_foundation_sdk.builders.dashboard import AnnotationQuery, Dashboard, Row
from grafana_foundation_sdk.models.dashboard import DataTransformerConfig
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from .panels import (
    DATASOURCE,
    DEFAULTS,
    MODEL,
    MODEL_WINDOW,
    bargauge_panel,
    dashboard,
    judged_stat,
    model_variable,
    name_stat,
    newest_version,
    panel,
    plain_stat,
    query,
    table_panel,
    threshold,
    timeseries_panel,
    variable,
    windowed,
)

#: The online log loss at which MlmonOnlineAccuracyDegraded's log-loss conditions fire:
#: online_logloss_max, or online_logloss_vs_offline_ratio_max times the serving
#: version's validation log loss (online / ratio), whichever is lower.
LOGLOSS_LIMIT = (
    f"min by (model) ("
    f"(mlmon_online_logloss{{{MODEL_WINDOW}}} / mlmon_online_logloss_vs_offline_ratio{{{MODEL_WINDOW}}})"
    f" * on (model) group_left {threshold('online_logloss_vs_offline_ratio_max')}"
    f" or {threshold('online_logloss_max')})"
)


#: The skew table's columns: (header, PromQL per feature of the window), worst PSI first.
SKEW_COLUMNS = (
    ("PSI", f"max by (feature) (mlmon_feature_skew_psi{{{MODEL_WINDOW}}})"),
    ("std. mean difference", f"max by (feature) (mlmon_feature_skew_standardized_mean_difference{{{MODEL_WINDOW}}})"),
    ("missing, serving", f"max by (feature) (mlmon_serving_feature_missing_ratio{{{MODEL_WINDOW}}})"),
    # serving minus delta: the missing share of the very version compared with
    (
        "missing, training",
        f"max by (feature) (mlmon_serving_feature_missing_ratio{{{MODEL_WINDOW}}}"
        f" - mlmon_feature_skew_missing_ratio_delta{{{MODEL_WINDOW}}})",
    ),
    ("mean, serving", f"max by (feature) (mlmon_serving_feature_mean{{{MODEL_WINDOW}}})"),
    ("mean, training (newest version)", f"max by (feature) (mlmon_training_feature_mean{{{MODEL}}})"),
)


def _skew_table() -> table.Panel:
    refs = "ABCDEF"
    return (
        table_panel(
            "Feature skew, worst first",
            "Each feature of the window against the training data of the version that served it (`mlmon_feature_skew_reference_info`): PSI on the training bins "
            "(`mlmon_feature_skew_psi`), standardized mean difference (`mlmon_feature_skew_standardized_mean_difference`), missing shares side by side "
            "(`mlmon_serving_feature_missing_ratio`, training = serving - `mlmon_feature_skew_missing_ratio_delta`) and means (`mlmon_serving_feature_mean`, "
            "`mlmon_training_feature_mean` of the newest version). Sorted by PSI, largest first; MlmonFeatureSkew fires past the model's thresholds.",
            "none",
            [
                query(expr, header, ref, instant=True, fmt=PromQueryFormat.TABLE)
                for ref, (header, expr) in zip(refs, SKEW_COLUMNS, strict=True)
            ],
            24,
            8,
        )
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        f"Value #{ref}": header for ref, (header, _) in zip(refs, SKEW_COLUMNS, strict=True)
                    },
                },
            )
        )
        .with_transformation(DataTransformerConfig(id_val="sortBy", options={"sort": [{"field": "PSI", "desc": True}]}))
        .decimals(3)
    )


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
            name_stat("Version", "Newest trained version of the model (`mlmon_model_info`).", newest_version(), w=3)
        )
        .with_panel(
            plain_stat(
                "Trained at",
                "Training time of the newest version (`mlmon_model_trained_timestamp_seconds`), UTC.",
                "dateTimeAsIso",
                query(
                    f"max by (model) (mlmon_model_trained_timestamp_seconds{{{MODEL}}}) * 1000", "trained", instant=True
                ),
                w=3,
            )
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
        .with_row(Row("Features: training vs serving"))
        .with_panel(_skew_table())
        .with_panel(
            timeseries_panel(
                "Feature PSI over time",
                "PSI of the 10 most skewed features of the window against the serving version's training data (`mlmon_feature_skew_psi`) and this model's "
                f"`feature_skew_psi_max` (default {DEFAULTS.feature_skew_psi_max}): a step at a deploy is a pipeline bug, a slow rise a population change (docs/runbook.md).",
                "none",
                [
                    query(f"topk(10, max by (feature) (mlmon_feature_skew_psi{{{MODEL_WINDOW}}}))", "{{feature}}"),
                    query(threshold("feature_skew_psi_max"), "threshold", "B"),
                ],
                w=12,
            )
        )
        .with_panel(
            bargauge_panel(
                "Category shares: training vs serving",
                "Share of each training category (and `__other__`) among a categorical feature's values: the newest version's training data "
                "(`mlmon_training_feature_category_share_ratio`) beside the window (`mlmon_serving_feature_category_share_ratio`), and the "
                "share of categories training never had (`mlmon_serving_feature_unseen_ratio`).",
                "percentunit",
                [
                    query(
                        f"max by (feature, category) (mlmon_training_feature_category_share_ratio{{{MODEL}}})",
                        "{{feature}}={{category}} training",
                        instant=True,
                    ),
                    query(
                        f"max by (feature, category) (mlmon_serving_feature_category_share_ratio{{{MODEL_WINDOW}}})",
                        "{{feature}}={{category}} serving",
                        "B",
                        instant=True,
                    ),
                    query(
                        f"max by (feature) (mlmon_serving_feature_unseen_ratio{{{MODEL_WINDOW}}})",
                        "{{feature}} unseen",
                        "C",
                        instant=True,
                    ),
                ],
                w=12,
                h=8,
            )
            .min(0)
            .max(1)
        )
    )
