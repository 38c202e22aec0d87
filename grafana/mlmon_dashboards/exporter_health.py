"""The exporter health dashboard (uid mlmon-exporter): is mlmon itself healthy? Sources
up, refresh times and errors, scrapes, process resources."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models.common import BigValueTextMode

from .panels import (
    JOB,
    dashboard,
    model_variable,
    name_stat,
    process_cpu,
    process_memory,
    query,
    timeseries_panel,
    up_stat,
    variable,
)


def exporter_health() -> Dashboard:
    """Is mlmon itself healthy: sources up, refresh times and errors, scrapes, resources."""
    models = f'{JOB}, model=~"$model"'
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
            up_stat(
                "Exporter up",
                "Whether Prometheus scrapes each mlmon target (`up`).",
                query(f"up{{{JOB}}}", "{{instance}}", instant=True),
                w=4,
            )
        )
        .with_panel(
            up_stat(
                "State database up",
                "Whether mlmon's last read of its state database (training runs) succeeded (`mlmon_state_up`).",
                query(f"mlmon_state_up{{{JOB}}}", "{{instance}}", instant=True),
                w=4,
            )
        )
        .with_panel(
            name_stat(
                "mlmon version",
                "Build of each mlmon target (`mlmon_build_info`).",
                query(f"mlmon_build_info{{{JOB}}}", "{{version}}", instant=True),
                w=4,
            )
        )
        .with_panel(
            up_stat(
                "Sources up",
                "Whether the last refresh of each model's source succeeded (`mlmon_source_up`); a failed source keeps its last values for the staleness period.",
                query(f"mlmon_source_up{{{models}}}", "{{model}} {{source}}", instant=True),
                w=12,
            ).text_mode(BigValueTextMode.VALUE_AND_NAME)
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
                        f"sum by (reason) (rate(mlmon_state_errors_total{{{JOB}}}[$__rate_interval]))",
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
                [query(f"scrape_duration_seconds{{{JOB}}}", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            process_memory(
                "Process memory",
                "Resident memory of the mlmon process (`process_resident_memory_bytes`); it must not grow with the store's row count.",
            )
        )
        .with_panel(
            process_cpu(
                "Process CPU",
                "CPU time of the mlmon process per second (`rate(process_cpu_seconds_total)`); 100 % is one core.",
            )
        )
    )
