"""Python client for training pipelines: summarize a run locally and report it to mlmon.

A training pipeline calls :func:`report_training_run` with its training DataFrame and its
validation labels and scores. The summary (row counts, validation log loss and ROC AUC,
one :class:`~exporter.training.schema.FeatureSummary` per column) is computed here, with the
same conventions as the server (docs/metrics.md); only the summary is sent, never rows.

Example::

    from exporter.client import report_training_run

    report_training_run(
        "http://mlmon:9847", model="car_loan", version="2026-11-28",
        trained_at=datetime.now(timezone.utc), training_data=train_df,
        validation=(y_valid, model.predict_proba(X_valid)[:, 1]),
    )

The bearer token defaults to the environment variable ``MLMON_API_TOKEN``. A report that
fails on the way (mlmon restarting, its state database briefly away) is retried a few
times (:data:`RETRY_DELAYS`): a run is stored once per model and version, so a retry of
a run that did get stored is answered ``unchanged`` and stores nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd

from exporter.errors import error_lines
from exporter.monitoring_math import LOGLOSS_EPS, roc_auc_from_counts
from exporter.training.schema import FEATURE_PERCENTILES, OTHER, VALUE_SHARES_MAX, FeatureSummary, TrainingRun

log = logging.getLogger(__name__)

#: Path of the training-run endpoint under the mlmon base URL.
TRAINING_RUNS_PATH = "/api/v1/training-runs"
#: Environment variable holding the default bearer token.
TOKEN_ENV = "MLMON_API_TOKEN"
#: Category text longer than this is rejected by the server (``FeatureSummary`` names).
_MAX_CATEGORY_CHARS = 200
#: Default most distinct values of a numeric feature sent exactly (``value_shares``): enough
#: for count-like features (Poisson(30) has ~50 distinct values), well under the API's cap.
MAX_EXACT_VALUES = 200
#: Non-JSON error bodies (a proxy's HTML page) are cut to this many characters.
_MAX_DETAIL_CHARS = 500
#: Seconds to wait before each retry of a report (4 retries, 15 s of waiting in all):
#: long enough for mlmon or its state database to restart, short enough for a pipeline.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
#: Failures worth a retry: connection refused or cut, timeouts, and the statuses of a
#: server or proxy that is briefly unable to answer. Everything else would fail again.
_TRANSIENT_ERRORS = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
_TRANSIENT_STATUSES = (502, 503, 504)


class ReportError(Exception):
    """mlmon answered a training-run report with a status other than 200/201.

    ``status_code`` is the HTTP status (401 bad token, 409 another body is already stored
    for this model and version, 413 body too large, 422 invalid run, ...); ``detail`` is
    the server's explanation (the ``detail`` of FastAPI's error body, one line per problem).
    """

    def __init__(self, status_code: int, detail: str):
        # The usual cause of a 401 is a token not given at all: say both ways to give it.
        hint = f"; pass the token (token=, or --token) or set ${TOKEN_ENV}" if status_code == 401 else ""
        super().__init__(f"mlmon rejected the training run (HTTP {status_code}): {detail}{hint}")
        self.status_code = status_code
        self.detail = detail


# ---------------------------------------------------------------------------------------
# Feature summaries


def _show(value: Any) -> str:
    # repr of the Python value (11, 'high', nan), not NumPy's np.int64(11) wrappers.
    return repr(value.item() if isinstance(value, np.generic) else value)


def _is_numeric(dtype: Any) -> bool:
    # Integer and float dtypes, NumPy or pandas nullable; bool is an integer subtype in
    # NumPy but a category here. Complex numbers have no order, so they are not numeric.
    return (pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_float_dtype(dtype)) and not (
        pd.api.types.is_bool_dtype(dtype)
    )


def _numeric_summary(name: str, series: pd.Series, missing: pd.Series, max_exact_values: int) -> FeatureSummary:
    count = len(series)
    values = series[~missing].to_numpy(dtype=np.float64)
    infinite = np.flatnonzero(np.isinf(values))
    if len(infinite):
        label = series.index[~missing.to_numpy()][infinite[0]]
        raise ValueError(
            f"feature {name!r}: row {_show(label)} holds {values[infinite[0]]}; a numeric feature must be "
            "finite (replace infinities with NaN to count them as missing)"
        )
    fields: dict[str, Any] = {}
    if len(values):
        fields = {
            "mean": float(np.mean(values)),
            "stddev": float(np.std(values)),  # ddof=0: population stddev (docs/metrics.md)
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "percentiles": {
                str(q): float(v)
                for q, v in zip(
                    FEATURE_PERCENTILES, np.percentile(values, FEATURE_PERCENTILES, method="linear"), strict=False
                )
            },
        }
        # Few distinct values (a flag, a count): percentiles coincide and cannot tell 70%
        # zeros from 50%, and interpolating a step CDF misreads counts (Poisson(15) read
        # 0.055 unchanged), so the exact distribution goes along for the PSI.
        distinct, counts = np.unique(values, return_counts=True)
        if len(distinct) <= max_exact_values:
            fields["value_shares"] = [(float(v), int(n) / len(values)) for v, n in zip(distinct, counts, strict=False)]
    return FeatureSummary(
        name=name,
        kind="numeric",
        count=count,
        missing_ratio=int(missing.sum()) / count if count else 0.0,
        **fields,
    )


def _categorical_summary(name: str, series: pd.Series, missing: pd.Series, top_k: int) -> FeatureSummary:
    count = len(series)
    # Counting the text, not the raw values, so that two values with the same text (1 and
    # "1") share one key instead of producing duplicate keys; object first, so that the
    # unused categories of a category dtype are not counted as zero-share categories.
    counts = series[~missing].astype(object).map(str).value_counts(sort=False)
    present = int(counts.sum())
    # Most frequent first, ties by category text (a stable sort of the text-sorted
    # counts), so the same data gives the same top k.
    ranked = counts.sort_index().sort_values(ascending=False, kind="stable")
    top, rest = ranked.iloc[:top_k], ranked.iloc[top_k:]
    for category in top.index:
        if not category or len(category) > _MAX_CATEGORY_CHARS or category == OTHER:
            raise ValueError(
                f"feature {name!r}: category {category[:50]!r} cannot be reported (category text must "
                f"be 1 to {_MAX_CATEGORY_CHARS} characters and not {OTHER!r}); map it to another value "
                "or leave the column out"
            )
    categories = {category: int(n) / present for category, n in top.items()}
    if len(rest):
        categories[OTHER] = int(rest.sum()) / present
    return FeatureSummary(
        name=name,
        kind="categorical",
        count=count,
        missing_ratio=int(missing.sum()) / count if count else 0.0,
        categories=categories,
    )


def summarize_features(
    frame: pd.DataFrame, top_k: int = 20, categorical: Iterable[str] = (), max_exact_values: int = MAX_EXACT_VALUES
) -> list[FeatureSummary]:
    """One summary per column of ``frame``, in column order (feature name = ``str(column)``).

    Integer and float columns are ``numeric`` unless named in ``categorical``; every other
    column (object, string, category, bool, datetime) is ``categorical``.

    - ``count``: all rows, missing ones included; ``missing_ratio`` = missing / count, where
      missing means NaN, None, NaT or pd.NA (0.0 for a column with no rows).
    - numeric: mean, population stddev (ddof=0), min, max and the percentiles
      ``FEATURE_PERCENTILES`` (``numpy.percentile``, linear interpolation; keys are the
      percentiles as strings) over the non-missing values; all ``None`` when there is none.
      A numeric column with at most ``max_exact_values`` (default 200, at most
      ``VALUE_SHARES_MAX`` = 1000) distinct non-missing values (a flag, a count) also gets
      ``value_shares``: each distinct value (ascending) with its share of the non-missing
      values, which makes its PSI exact (docs/metrics.md).
    - categorical: share of the non-missing values for each of the ``top_k`` most frequent
      categories (ties broken by category text), keyed by ``str(value)`` (``"True"``,
      ``"False"`` for bools; a float column named in ``categorical`` gives ``"1.0"``),
      plus ``OTHER`` (``"__other__"``) for the share of all other categories when there
      are more than ``top_k``. Shares sum to 1 (up to float rounding).

    Raises:
        ValueError: ``top_k`` < 1; ``max_exact_values`` not in 0 .. 1000; a name in
            ``categorical`` is not a column; a numeric
            column holds ±inf (it names the row); a reported category is empty, longer
            than 200 characters or equal to ``"__other__"``; a summary is invalid for
            ``FeatureSummary`` (e.g. an empty column name; pydantic's ``ValidationError``
            is a ``ValueError``).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not 0 <= max_exact_values <= VALUE_SHARES_MAX:
        raise ValueError(f"max_exact_values must be 0 to {VALUE_SHARES_MAX}, got {max_exact_values}")
    forced = set(categorical)
    unknown = forced - {str(column) for column in frame.columns}
    if unknown:
        raise ValueError(f"categorical: no column named {sorted(unknown)} in the training data")
    summaries = []
    for column, series in frame.items():
        name = str(column)
        missing = series.isna()
        if _is_numeric(series.dtype) and name not in forced:
            summaries.append(_numeric_summary(name, series, missing, max_exact_values))
        else:
            summaries.append(_categorical_summary(name, series, missing, top_k))
    return summaries


# ---------------------------------------------------------------------------------------
# Validation metrics


def _one_dimensional(values: Any, name: str) -> np.ndarray:
    array = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one dimension, got shape {array.shape}")
    return array


def _is_label(value: Any) -> bool:
    # bool, NumPy and Python numbers equal to 0 or 1; NaN, pd.NA and text are not labels.
    return isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)) and value in (0, 1)


def _labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a bool array (True = positive). Raises ValueError naming the first bad label."""
    if labels.dtype.kind == "b":
        return labels.astype(bool)
    if labels.dtype.kind in "iuf":
        bad = np.flatnonzero((labels != 0) & (labels != 1))  # NaN compares unequal to both
    else:
        bad = np.array([i for i, value in enumerate(labels) if not _is_label(value)], dtype=int)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"y_true[{i}] = {_show(labels[i])} is not a label 0 or 1")
    return labels == 1


def _scores(raw: np.ndarray) -> np.ndarray:
    """``raw`` as float64. Raises ValueError naming the first value that is not in [0, 1]."""
    try:
        scores = raw.astype(np.float64)
    except (TypeError, ValueError):
        scores = np.array([_float_or_nan(value) for value in raw], dtype=np.float64)
    bad = np.flatnonzero(~((scores >= 0.0) & (scores <= 1.0)))  # NaN fails both comparisons
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"y_score[{i}] = {_show(raw[i])} is not a probability in [0, 1]")
    return scores


def _float_or_nan(value: Any) -> float:
    # Text, pd.NA and other non-numbers become NaN, which _scores then reports by position.
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def validation_metrics(y_true: Any, y_score: Any) -> tuple[int, float | None, float | None]:
    """(rows, log loss, ROC AUC) of a validation set, as the server computes them.

    Args:
        y_true: shape (n,), labels 0/1 (bools, ints or floats equal to 0 or 1).
        y_score: shape (n,), predicted probabilities of class 1 in [0, 1].

    Log loss: -(1/n) sum [y ln p + (1 - y) ln(1 - p)], natural log, p cast to float64 and
    clipped to [1e-15, 1 - 1e-15] (docs/metrics.md; equals ``sklearn.metrics.log_loss``
    on the clipped scores). ROC AUC: Mann–Whitney with ties counted ½, exact, from the
    class counts per distinct score (``exporter.monitoring_math.roc_auc_from_counts``;
    equals ``sklearn.metrics.roc_auc_score``).

    Returns:
        ``(n, log_loss, auc)``; log loss is ``None`` when n = 0, AUC ``None`` when only
        one class is present (undefined, never 0 or 0.5).

    Raises:
        ValueError: the lengths differ, an array is not one-dimensional, a label is not 0
            or 1, or a score is NaN, missing, not a number or outside [0, 1]; the message
            names the first offending position (0-based) and value.
    """
    labels = _one_dimensional(y_true, "y_true")
    raw_scores = _one_dimensional(y_score, "y_score")
    if len(labels) != len(raw_scores):
        raise ValueError(f"y_true has {len(labels)} values but y_score has {len(raw_scores)}")
    positive = _labels(labels)
    scores = _scores(raw_scores)
    n = len(scores)
    if n == 0:
        return 0, None, None
    p = np.clip(scores, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    # ln(1 - p), not log1p(-p): the same expression as the server's SQL and scikit-learn.
    log_loss = float(-np.mean(np.where(positive, np.log(p), np.log(1.0 - p))))
    distinct, index = np.unique(scores, return_inverse=True)
    positives = np.bincount(index, weights=positive, minlength=len(distinct))
    negatives = np.bincount(index, weights=~positive, minlength=len(distinct))
    return n, log_loss, roc_auc_from_counts(positives, negatives)


# ---------------------------------------------------------------------------------------
# Building and sending a run


def build_training_run(
    *,
    model: str,
    version: str,
    trained_at: datetime | str,
    training_data: pd.DataFrame | None = None,
    training_rows: int | None = None,
    validation: tuple[Any, Any] | None = None,
    extra_metrics: Mapping[str, float] | None = None,
    top_k: int = 20,
    categorical: Iterable[str] = (),
    max_exact_values: int = MAX_EXACT_VALUES,
) -> TrainingRun:
    """The :class:`TrainingRun` of one model version, summarized locally.

    Args:
        model, version: identifiers (see ``TrainingRun`` for the allowed characters).
        trained_at: when the run finished; naive means UTC; ISO-8601 text is accepted.
        training_data: the training features, one column per feature
            (:func:`summarize_features`); leave out the label column unless it should be
            monitored as a feature.
        training_rows: rows trained on; default ``len(training_data)`` (give it when
            ``training_data`` is a sample).
        validation: ``(y_true, y_score)`` of the validation set (:func:`validation_metrics`).
        extra_metrics: any other finite numbers to keep with the run (name -> value).
        top_k, categorical, max_exact_values: passed to :func:`summarize_features`.

    Raises:
        ValueError: neither ``training_data`` nor ``training_rows`` is given, or the
            inputs are invalid (see :func:`summarize_features`, :func:`validation_metrics`;
            pydantic's ``ValidationError`` for the run itself is a ``ValueError``).
    """
    if training_rows is None:
        if training_data is None:
            raise ValueError("give training_data or training_rows")
        training_rows = len(training_data)
    validation_rows = validation_logloss = validation_roc_auc = None
    if validation is not None:
        y_true, y_score = validation
        validation_rows, validation_logloss, validation_roc_auc = validation_metrics(y_true, y_score)
    features = [] if training_data is None else summarize_features(training_data, top_k, categorical, max_exact_values)
    return TrainingRun(
        model=model,
        version=version,
        trained_at=trained_at,
        training_rows=training_rows,
        validation_rows=validation_rows,
        validation_logloss=validation_logloss,
        validation_roc_auc=validation_roc_auc,
        extra_metrics=dict(extra_metrics or {}),
        features=features,
    )


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):  # not JSON, or JSON without a detail
        return response.text[:_MAX_DETAIL_CHARS] or response.reason_phrase
    if isinstance(detail, list) and all(isinstance(e, Mapping) for e in detail):
        return "\n".join(error_lines(detail))
    return str(detail)


def post_training_run(
    url: str,
    run: TrainingRun,
    token: str | None = None,
    timeout: float = 10.0,
    http: httpx.Client | None = None,
    retry_delays: Sequence[float] | None = None,
) -> dict:
    """POST ``run`` to ``{url}/api/v1/training-runs`` and return the server's JSON answer.

    A connection error, a timeout or a 502/503/504 answer is retried after each of
    ``retry_delays`` in turn, or after the answer's ``Retry-After`` when longer (at most
    60 s), logged as a warning; the last failure is raised. Retrying
    is safe because the server stores a run once per (model, version): when an earlier
    attempt was stored after all (its answer lost), the retry is answered ``unchanged``.

    Args:
        url: mlmon's base URL (``http://host:9847``); a trailing slash is ignored.
        run: the run; its ``canonical_json()`` is the body, so re-sending the same run
            is recognized by the server as identical.
        token: bearer token; default the environment variable ``MLMON_API_TOKEN``; no
            ``Authorization`` header when neither is set.
        timeout: seconds per attempt, for the client created here (ignored when ``http``
            is given).
        http: an ``httpx.Client`` to send with (e.g. FastAPI's ``TestClient``); by default
            one is created and closed.
        retry_delays: seconds to wait before each retry; default :data:`RETRY_DELAYS`;
            ``()`` sends once.

    Raises:
        ReportError: the server answered anything but 200/201 (e.g. 409 when another
            body is stored for this model and version; 503 after the last retry).
        httpx.HTTPError: the server could not be reached or timed out, after the last retry.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = url.rstrip("/") + TRAINING_RUNS_PATH
    body = run.canonical_json()
    delays = RETRY_DELAYS if retry_delays is None else retry_delays
    with httpx.Client(timeout=timeout) if http is None else contextlib.nullcontext(http) as client:
        for delay in (*delays, None):
            try:
                response = client.post(endpoint, content=body, headers=headers)
            except _TRANSIENT_ERRORS as exc:
                if delay is None:
                    raise
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in _TRANSIENT_STATUSES or delay is None:
                    break
                problem = f"HTTP {response.status_code}"
                delay = max(delay, _retry_after(response))
            log.warning("reporting to mlmon at %s failed (%s); retrying in %g s", redact_url(url), problem, delay)
            time.sleep(delay)
    if response.status_code not in (200, 201):
        raise ReportError(response.status_code, _detail(response))
    return response.json()


def _retry_after(response: httpx.Response) -> float:
    """The server's ``Retry-After`` in seconds (0 when absent or an HTTP date), at most a minute."""
    try:
        return min(max(float(response.headers.get("retry-after", 0)), 0.0), 60.0)
    except ValueError:
        return 0.0


def redact_url(url: str) -> str:
    """``url`` without the user name and password it may carry, for logs and messages."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        return "<invalid URL>"


def report_training_run(
    url: str,
    *,
    model: str,
    version: str,
    trained_at: datetime | str,
    training_data: pd.DataFrame | None = None,
    validation: tuple[Any, Any] | None = None,
    extra_metrics: Mapping[str, float] | None = None,
    training_rows: int | None = None,
    token: str | None = None,
    top_k: int = 20,
    categorical: Iterable[str] = (),
    max_exact_values: int = MAX_EXACT_VALUES,
    timeout: float = 10.0,
    http: httpx.Client | None = None,
    retry_delays: Sequence[float] | None = None,
) -> dict:
    """Summarize a training run locally (:func:`build_training_run`) and report it
    (:func:`post_training_run`); only the summary leaves the process.

    Returns:
        The server's decoded JSON answer.

    Raises:
        ValueError: invalid inputs (see :func:`build_training_run`); nothing is sent.
        ReportError: the server rejected the run (status and its ``detail``).
        httpx.HTTPError: the server could not be reached or timed out, after the
            retries (``retry_delays``: see :func:`post_training_run`).
    """
    run = build_training_run(
        model=model,
        version=version,
        trained_at=trained_at,
        training_data=training_data,
        training_rows=training_rows,
        validation=validation,
        extra_metrics=extra_metrics,
        top_k=top_k,
        categorical=categorical,
        max_exact_values=max_exact_values,
    )
    return post_training_run(url, run, token=token, timeout=timeout, http=http, retry_delays=retry_delays)
