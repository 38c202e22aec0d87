"""The training-run summary: what a training pipeline reports for one model version.

The same pydantic models validate ``POST /api/v1/training-runs`` on the server and are
built by ``exporter.client`` from a DataFrame, so both sides share one definition.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from exporter.versions import VERSION_MAX_LENGTH

#: Percentiles reported for numeric features; the deciles serve as the PSI bins.
FEATURE_PERCENTILES = (1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95, 99)
#: The category that holds the shares of every category outside the top k.
OTHER = "__other__"
#: Shares must sum to 1 within this tolerance (float rounding of the client's division).
SHARE_TOLERANCE = 1e-6


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
#: Row counts are stored as BIGINT in the state database: a larger one must be a 422, not
#: an overflow in the database driver.
Rows = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: The most distinct values a numeric feature's ``value_shares`` may list.
VALUE_SHARES_MAX = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSummary(_Body):
    """One feature of the training data.

    ``count`` counts every row, missing ones included; ``missing_ratio`` = missing / count.
    Numeric: mean, population stddev, min, max and ``percentiles`` (keys
    ``FEATURE_PERCENTILES`` as strings, linear interpolation) over non-missing values.
    Optional for numeric features with few distinct values: ``value_shares``, each
    distinct non-missing value and its share of the non-missing values, ascending by value
    (from min to max), shares summing to 1; the client gives it for at most ``top_k``
    distinct values, and PSI then uses it instead of the percentiles (docs/metrics.md).
    Categorical: ``categories`` maps the top-k categories (and ``__other__``) to their
    share of the non-missing values; shares sum to 1.
    """

    name: Name
    kind: Literal["numeric", "categorical"]
    count: Rows
    missing_ratio: Ratio
    mean: Finite | None = None
    stddev: Annotated[Finite, Field(ge=0.0)] | None = None
    min: Finite | None = None
    max: Finite | None = None
    percentiles: dict[str, Finite] = {}
    categories: dict[Name, Ratio] = {}
    value_shares: Annotated[list[tuple[Finite, Ratio]], Field(min_length=1, max_length=VALUE_SHARES_MAX)] | None = None

    @property
    def present(self) -> bool:
        """Whether the feature has any non-missing value."""
        return self.count > 0 and self.missing_ratio < 1.0

    @model_validator(mode="after")
    def _by_kind(self) -> FeatureSummary:
        present = self.present
        if self.value_shares is not None:
            self._check_value_shares(present)
        if self.kind == "numeric":
            if self.categories:
                raise ValueError("categories: only for categorical features")
            if present and None in (self.mean, self.stddev, self.min, self.max):
                raise ValueError("a numeric feature with values needs mean, stddev, min and max")
            unknown = set(self.percentiles) - {str(q) for q in FEATURE_PERCENTILES}
            if unknown:
                raise ValueError(f"percentiles: unknown key(s) {sorted(unknown)}; allowed {list(FEATURE_PERCENTILES)}")
            values = [self.percentiles[str(q)] for q in FEATURE_PERCENTILES if str(q) in self.percentiles]
            if self.min is not None and self.max is not None:
                values = [self.min, *values, self.max]
            if any(b < a for a, b in zip(values, values[1:], strict=False)):
                raise ValueError("min <= percentiles <= max must hold, in percentile order")
        else:
            if any(v is not None for v in (self.mean, self.stddev, self.min, self.max)) or self.percentiles:
                raise ValueError("mean, stddev, min, max and percentiles are only for numeric features")
            total = math.fsum(self.categories.values())
            if present and abs(total - 1.0) > SHARE_TOLERANCE:
                raise ValueError(f"categories: shares must sum to 1, got {total}")
        return self

    def _check_value_shares(self, present: bool) -> None:
        if self.kind != "numeric":
            raise ValueError("value_shares: only for numeric features")
        if not present:
            raise ValueError("value_shares: only for a feature with non-missing values")
        shares = self.value_shares or []  # called only when given
        values = [v for v, _ in shares]
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("value_shares: values must be distinct and ascending")
        if (values[0], values[-1]) != (self.min, self.max):
            raise ValueError(f"value_shares: values must run from min to max, got {values[0]} to {values[-1]}")
        total = math.fsum(share for _, share in shares)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"value_shares: shares must sum to 1, got {total}")


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; naive means UTC, as everywhere in mlmon."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: The ``30d`` baseline is the newest run trained at least this long before the newest one:
#: 720 hours, not 30 calendar days (PostgreSQL's ``'30 days'`` on a timestamptz follows the
#: session's daylight-saving changes). The state database subtracts it in SQL.
BASELINE_AGE = timedelta(days=30)
#: Training times a run may have, [TRAINED_AT_MIN, TRAINED_AT_MAX) in UTC. Within them every
#: later stage's date arithmetic fits: the UTC conversion, the baseline's ``- BASELINE_AGE``,
#: a driver's conversion into its session time zone (at most ±1 day) and the epoch seconds
#: of ``mlmon_model_trained_timestamp_seconds``. Before 1970 no model was trained.
TRAINED_AT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TRAINED_AT_MAX = datetime(9999, 1, 1, tzinfo=UTC)


def _trained_at(value: datetime) -> datetime:
    try:
        value = as_utc(value)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before the first datetime in UTC
        raise ValueError(f"must be between {TRAINED_AT_MIN.isoformat()} and {TRAINED_AT_MAX.isoformat()}") from None
    if not TRAINED_AT_MIN <= value < TRAINED_AT_MAX:
        raise ValueError(
            f"must be between {TRAINED_AT_MIN.isoformat()} and {TRAINED_AT_MAX.isoformat()}, got {value.isoformat()}"
        )
    return value


def _addressable(value: str) -> str:
    # '.' and '..' are dot segments: curl, httpx and browsers remove them from a URL path, so
    # DELETE /api/v1/models/{model}/versions/{version} could never reach such a run.
    if value in (".", ".."):
        raise ValueError(f"{value!r} cannot be a URL path segment; use another name")
    return value


class TrainingRun(_Body):
    """One training run of one model version, as reported to ``POST /api/v1/training-runs``.

    ``validation_logloss`` (natural log, probabilities clipped to [1e-15, 1 - 1e-15]) and
    ``validation_roc_auc`` (Mann–Whitney with ties ½) follow docs/metrics.md. ``trained_at``
    (naive means UTC) must lie in [``TRAINED_AT_MIN``, ``TRAINED_AT_MAX``). ``model`` and
    ``version`` are path segments of the API's URLs: letters, digits and ``_.:-`` (``+``
    too in a version), not ``.`` or ``..`` (raises ``ValueError`` naming the field).
    """

    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$"), AfterValidator(_addressable)]
    version: Annotated[
        str, Field(pattern=rf"^[A-Za-z0-9_.:+-]{{1,{VERSION_MAX_LENGTH}}}$"), AfterValidator(_addressable)
    ]
    trained_at: Annotated[datetime, AfterValidator(_trained_at)]
    training_rows: Rows
    validation_rows: Rows | None = None
    validation_logloss: Annotated[Finite, Field(ge=0.0)] | None = None
    validation_roc_auc: Ratio | None = None
    extra_metrics: dict[Name, Finite] = Field(default={}, max_length=100)
    features: list[FeatureSummary] = Field(default=[], max_length=1000)

    @model_validator(mode="after")
    def _unique_features(self) -> TrainingRun:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"features: duplicate feature name(s) {duplicates}")
        return self

    def canonical_json(self) -> str:
        """The run as JSON with sorted keys, to tell an identical re-report from a conflict."""
        body = self.model_dump(mode="json")
        # A run without value_shares keeps the JSON (and so the stored body's digest) it
        # had before the field existed: re-reporting a run stored earlier is no conflict.
        for feature in body["features"]:
            if feature["value_shares"] is None:
                del feature["value_shares"]
        return json.dumps(body, sort_keys=True, separators=(",", ":"))
