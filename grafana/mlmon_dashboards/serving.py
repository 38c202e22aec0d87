"""The serving system dashboard (uid mlmon-serving): the model server that teams watch
next to the model, from prometheus-fastapi-instrumentator's standard metrics, the
process collector and the server's prediction-cache counters."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from .panels import (
    JOB,
    dashboard,
    plain_stat,
    process_cpu,
    process_memory,
    query,
    stat_panel,
    steps,
    timeseries_panel,
    variable,
)


def serving() -> Dashboard:
    """The model server's side: traffic, errors, latency, resources, prediction cache."""
    requests = f"sum(rate(http_requests_total{{{JOB}}}[$__rate_interval]))"
    hits = f"sum(rate(model_server_cache_hits_total{{{JOB}}}[$__rate_interval]))"
    misses = f"sum(rate(model_server_cache_misses_total{{{JOB}}}[$__rate_interval]))"
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
            plain_stat(
                "Instances up",
                "Targets of the job that Prometheus scrapes successfully (`up`).",
                "short",
                query(f"sum(up{{{JOB}}})", "up", instant=True),
                w=6,
            )
        )
        .with_panel(
            plain_stat(
                "Request rate",
                "Requests per second, all handlers (`http_requests_total`).",
                "reqps",
                query(requests, "requests", instant=True),
                w=6,
            )
        )
        .with_panel(
            stat_panel(
                "Error ratio",
                "Share of requests answered with a 5xx status (`http_requests_total`).",
                "percentunit",
                [
                    query(
                        f'sum(rate(http_requests_total{{{JOB}, status=~"5.."}}[$__rate_interval])) / {requests}',
                        "errors",
                        instant=True,
                    )
                ],
                w=6,
            ).thresholds(steps((None, "green"), (0.01, "red")))
        )
        .with_panel(
            plain_stat(
                "Prediction cache hit ratio",
                "Share of predictions answered from the server's cache (`model_server_cache_hits_total` / (hits + `model_server_cache_misses_total`)).",
                "percentunit",
                query(f"{hits} / ({hits} + {misses})", "hit ratio", instant=True),
                w=6,
            )
        )
        .with_panel(
            timeseries_panel(
                "Requests by handler and status",
                "Requests per second by handler and status class (`http_requests_total`).",
                "reqps",
                [
                    query(
                        f"sum by (handler, status) (rate(http_requests_total{{{JOB}}}[$__rate_interval]))",
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
                        f'sum by (handler) (rate(http_requests_total{{{JOB}, status=~"5.."}}[$__rate_interval])) / sum by (handler) (rate(http_requests_total{{{JOB}}}[$__rate_interval]))',
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
                        f"histogram_quantile({q}, sum by (le) (rate(http_request_duration_highr_seconds_bucket{{{JOB}}}[$__rate_interval])))",
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
                        f"histogram_quantile(0.95, sum by (handler, le) (rate(http_request_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))",
                        "{{handler}}",
                    )
                ],
            )
        )
        .with_panel(
            process_cpu(
                "CPU",
                "CPU time of each server process per second (`rate(process_cpu_seconds_total)`); 100 % is one core.",
            )
        )
        .with_panel(
            process_memory("Memory", "Resident memory of each server process (`process_resident_memory_bytes`).")
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
