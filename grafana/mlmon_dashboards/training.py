"""The training dashboard (uid mlmon-training): training runs of one model by version.
Did the data shrink, did offline accuracy worsen, did a feature's distribution change?"""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, common
from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models.common import BigValueTextMode, VizOrientation
from grafana_foundation_sdk.models.dashboard import DataTransformerConfig
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from .panels import (
    DEFAULTS,
    MODEL,
    bargauge_panel,
    dashboard,
    judged_stat,
    model_variable,
    name_stat,
    newest_version,
    panel,
    plain_stat,
    query,
    steps,
    table_panel,
    threshold,
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
        .with_panel(name_stat("Newest version", "Newest trained version (`mlmon_model_info`).", newest_version(), w=4))
        .with_panel(
            plain_stat(
                "Training rows",
                "Training rows of the newest version (`mlmon_training_rows`).",
                "short",
                query(f"max by (model) (mlmon_training_rows{{{MODEL}}})", "rows", instant=True),
                w=6,
            )
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
