"""The YAML configuration, validated with pydantic.

Every error names the key path (``models[0].predictions.columns.score``). Strings may
hold ``${ENV_VAR}`` references, expanded before validation; a store URL may instead be
read from a file (``url_file``) so that secrets never sit in the config itself.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from exporter.durations import parse_duration
from exporter.errors import error_lines, yaml_error_line

DEFAULT_PORT = 9847

#: Upper bounds of the ``mlmon_prediction_score`` histogram: fine steps below 0.1 for
#: CTR/CVR-like probabilities, coarser ones up to 1 for balanced classifiers.
DEFAULT_SCORE_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.99,
    1.0,
)


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``"key.path: message"`` per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = errors


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


def _duration_or_zero(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value, allow_zero=True)


def _window(value: Any) -> str:
    # Before pydantic's str check, so that a bare number (YAML's 90) gets the duration
    # advice rather than "Input should be a valid string".
    parse_duration(value)
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Paris')") from None
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
DurationOrZero = Annotated[timedelta, BeforeValidator(_duration_or_zero)]
Window = Annotated[str, BeforeValidator(_window)]
TimeZone = Annotated[str, AfterValidator(_timezone)]
Identifier = Annotated[str, Field(min_length=1, max_length=128)]


class Strict(BaseModel):
    """Base for config sections: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _parse_url(text: str, key: str) -> sa.URL:
    """``text`` as a SQLAlchemy URL; a ValueError starting with ``key`` that never echoes
    the text (it may hold a password) when it is not one, its port is not in 1-65535 or
    its host holds an '@' (an unencoded '@' in the password)."""
    try:
        url = sa.make_url(text)
    except Exception:  # ArgumentError, or ValueError for a port that is not a number
        url = None
    if url is None or (url.port is not None and not 1 <= url.port <= 65535):
        raise ValueError(f"{key}: not a SQLAlchemy URL (dialect+driver://user@host:port/database, port 1-65535)")
    if url.host is not None and "@" in url.host:
        # SQLAlchemy splits at the first '@': the rest of the password would be taken as the host.
        raise ValueError(
            f"{key}: the host part holds an '@': percent-encode '@' in the password as %40 "
            "(or give the password apart, as 'password' or 'password_file')"
        )
    return url


class Store(Strict):
    """A SQL store: a SQLAlchemy URL given inline (``url``) or read from a file
    (``url_file``), and optionally its password apart from it (``password`` or
    ``password_file``), so that a password with any characters needs no URL-encoding and
    never sits in the URL text."""

    url: str | None = Field(default=None, repr=False)  # it may hold a password
    url_file: Path | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = None
    max_connections: int | None = Field(default=None, ge=1, le=1000)
    """The most connections mlmon holds to this database at once; default one per thread
    that uses it at once (``mlmon serve``: one per model reading the store), at most
    ``db.DEFAULT_MAX_CONNECTIONS``. Refreshes beyond them wait for a free connection."""

    @model_validator(mode="after")
    def _one_url(self) -> Store:
        if (self.url is None) == (self.url_file is None):
            raise ValueError("give exactly one of 'url' or 'url_file'")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give at most one of 'password' or 'password_file'")
        # url_file is checked at load, as the API's token_file: a bad file is a config error
        # naming the key (check-config exits 2), not a traceback at every refresh.
        try:
            text, key = self._url_text()
        except OSError as exc:
            raise ValueError(f"url_file: cannot read {self.url_file}: {exc.strerror}") from None
        _parse_url(text, key)
        return self

    def _url_text(self) -> tuple[str, str]:
        """The configured URL's text and the key that gives it (``url_file`` read now).

        Raises:
            OSError: ``url_file`` cannot be read.
        """
        if self.url is not None:
            return self.url, "url"
        assert self.url_file is not None  # the validator requires exactly one of the two
        return Path(self.url_file).read_text().strip(), "url_file"

    def resolved_url(self) -> sa.URL:
        """The URL as a SQLAlchemy ``URL`` (whose ``str`` masks the password), reading
        ``url_file`` and ``password_file`` if that is how they were given.

        Raises:
            OSError: a file cannot be read.
            ValueError: ``url_file`` no longer holds a SQLAlchemy URL (the URL not echoed).
        """
        url = _parse_url(*self._url_text())
        password = self.password
        if self.password_file is not None:
            password = Path(self.password_file).read_text().rstrip("\n")
        return url if password is None else url.set(password=password)


class PredictionColumns(Strict):
    """Column names of the prediction log; ``version`` (the serving model version) is optional."""

    id: Identifier
    timestamp: Identifier
    score: Identifier
    version: Identifier | None = None


class LabelColumns(Strict):
    """Column names of the label table; with ``timestamp``, only labels older than the refresh count."""

    id: Identifier
    label: Identifier
    timestamp: Identifier | None = None


class ReplayColumns(Strict):
    """Column names of the replay table (offline re-computed scores, joined by id)."""

    id: Identifier
    score: Identifier


class TableSource(Strict):
    """Where a logical source lives: a store name, an optional schema and a table."""

    store: Identifier
    table: Identifier
    db_schema: Identifier | None = Field(default=None, alias="schema")
    timezone: TimeZone = "UTC"
    """Time zone of naive timestamps in this table (DESIGN: naive means UTC unless set)."""


class PredictionSource(TableSource):
    """The prediction log: one row per served prediction."""

    columns: PredictionColumns
    filter: dict[Identifier, str | int | float | bool] = {}
    unique_ids: bool = False
    """Declare ids unique (a key the schema does not show, e.g. on a view) to skip the
    duplicate search; a primary key or unique constraint on the id column is found anyway."""
    ingestion_delay: DurationOrZero = timedelta(0)
    """How long after its timestamp a row may still be written; the prediction counter and
    histogram count a row only once it is older than this, so late rows are not missed."""


class LabelSource(TableSource):
    """Delayed ground truth, 0/1 per prediction id."""

    columns: LabelColumns
    missing: Literal["ignore", "negative"] = "ignore"
    """What a prediction without a label row means: unknown (``ignore``) or 0 (``negative``)."""


class ReplaySource(TableSource):
    """Offline replays of served predictions."""

    columns: ReplayColumns


#: ``numeric: all`` / ``categorical: all``: every column of that kind but the known ones.
ALL_COLUMNS = "all"
FeatureColumns = list[Identifier] | Literal["all"]


class FeatureSource(Strict):
    """The serving-time feature values of a model's predictions: columns of the prediction
    table (no ``table``) or of a table joined to it by id (``table`` and ``id``, in the
    predictions' store). Each feature is declared ``numeric`` or ``categorical``, as a list
    of columns or ``all``: every column of that kind (numbers; text or booleans) but the
    known ones (the predictions' columns and filters, the feature table's id, ``exclude``)."""

    table: Identifier | None = None
    db_schema: Identifier | None = Field(default=None, alias="schema")
    id: Identifier | None = None
    """The feature table's id column, joined to the predictions' id (only with ``table``)."""
    numeric: FeatureColumns = []
    categorical: FeatureColumns = []
    exclude: list[Identifier] = []
    """Columns ``all`` leaves out."""

    @model_validator(mode="after")
    def _check(self) -> FeatureSource:
        if (self.table is None) != (self.id is None):
            raise ValueError(
                "give 'table' and 'id' together (a joined feature table), or neither (the prediction table)"
            )
        if self.db_schema is not None and self.table is None:
            raise ValueError("schema: only with 'table'")
        if not self.numeric and not self.categorical:
            raise ValueError("declare at least one feature in 'numeric' or 'categorical'")
        if self.numeric == ALL_COLUMNS and self.categorical == ALL_COLUMNS:
            pass  # kinds split by column type at reflection
        elif isinstance(self.numeric, list) and isinstance(self.categorical, list):
            both = sorted(set(self.numeric) & set(self.categorical))
            if both:
                raise ValueError(f"column(s) {both} declared both numeric and categorical")
        for kind in ("numeric", "categorical"):
            names = getattr(self, kind)
            if isinstance(names, list) and len(set(names)) != len(names):
                raise ValueError(f"{kind}: duplicate column in {names}")
        if self.exclude and ALL_COLUMNS not in (self.numeric, self.categorical):
            raise ValueError("exclude: only with 'numeric: all' or 'categorical: all'")
        return self


class ReplayTolerance(Strict):
    """A replay reproduces a served score when ``|a - b| <= atol + rtol * max(|a|, |b|)``."""

    atol: float = Field(default=1e-6, ge=0)
    rtol: float = Field(default=1e-6, ge=0)


class AlertThresholds(Strict):
    """Thresholds of the shipped alert rules, exported as ``mlmon_alert_threshold`` so that
    one rule file serves every model. ``None`` switches that condition off."""

    offline_logloss_change_ratio_max: float | None = 1.10
    """Newest version's validation log loss / the previous version's."""
    offline_roc_auc_change_ratio_min: float | None = 0.98
    training_rows_change_ratio_min: float | None = 0.70
    """Newest version's training rows / the previous version's, and / the version of ~30 days ago."""
    online_logloss_max: float | None = None
    online_logloss_vs_offline_ratio_max: float | None = 1.25
    online_roc_auc_min: float | None = None
    online_labeled_predictions_min: float | None = 1000
    """Online accuracy alerts need at least this many labeled predictions in the window..."""
    online_positive_labels_min: float | None = 10
    """...and this many positive labels."""
    window_predictions_min: float | None = 100
    """Mode-share, reproducibility and score-shift alerts need this many predictions in the window."""
    prediction_age_seconds_max: float | None = 3600
    """Newest prediction older than this: predictions stopped arriving."""
    future_predictions_max: float | None = 0
    """More predictions than this stamped a minute or more ahead of mlmon's clock: clock skew."""
    prediction_mean_change_ratio_max: float | None = 1.5
    """Mean score now vs the same time 1 and 7 days ago, above this or below its inverse."""
    reproducibility_ratio_min: float | None = 0.99
    mode_share_ratio_max: float | None = 0.5
    calibration_ratio_max: float | None = 1.25
    calibration_ratio_min: float | None = 0.8
    label_coverage_ratio_min: float | None = None
    feature_skew_psi_max: float | None = 0.25
    """A feature's PSI between serving (window) and the serving version's training data above this."""
    feature_skew_smd_max: float | None = 0.5
    """|standardized mean difference| of a numeric feature, serving against training, above this."""
    feature_skew_missing_ratio_delta_max: float | None = 0.1
    """A feature's missing share at serving minus its training share, above this."""
    feature_values_min: float | None = 100
    """Feature skew alerts need this many rows (served by the compared version) in the window."""


#: The most time slices the largest window of a model may hold (``ModelConfig.time_slice``):
#: every kept slice costs memory, and a cold refresh names each one in its statement.
MAX_SLICES = 1440


class ModelConfig(Strict):
    """One monitored model: its sources, windows and numeric settings."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]
    predictions: PredictionSource
    labels: LabelSource | None = None
    replays: ReplaySource | None = None
    features: FeatureSource | None = None
    windows: Annotated[list[Window], Field(min_length=1)] = ["1h", "24h"]
    label_delay: DurationOrZero = timedelta(hours=1)
    mode_share_decimals: int = Field(default=6, ge=0, le=12)
    histogram_buckets: Annotated[list[float], Field(min_length=1)] = list(DEFAULT_SCORE_BUCKETS)
    replay_tolerance: ReplayTolerance = ReplayTolerance()
    replay_delay: DurationOrZero = timedelta(0)
    """With time slices, how long after a slice's end (and ``predictions.ingestion_delay``)
    its replays are read again at every refresh before its replay aggregates are kept: set
    it to how late your replay job writes. A replay written later counts from the next audit
    (``slice_audit_interval``; docs/metrics.md, *Replays on slices*)."""
    alert_thresholds: dict[str, float | None] = {}
    """Overrides of the top-level ``alerting`` thresholds for this model."""
    time_slice: Literal["auto"] | Duration | None = None
    """Width of the time slices (aligned to the epoch) whose prediction aggregates a refresh
    keeps and merges into windows, reading only the rows that can still change
    (``predictions.slices``); ``auto``: the smallest window / 12 or the largest / 288,
    whichever is longer, in whole seconds (5 minutes for windows 1h and 24h). Default: none,
    every refresh reads its windows in one pass (a cold read of slices returns a row per
    slice and bucket, too many at 10^7 predictions a day: docs/performance.md)."""
    slice_fill_refreshes: int = Field(default=24, ge=1)
    """With more than 1/this of the largest window's slices (rounded up) missing, besides
    those sealed since the refresh before (a cold start, after an outage of the store or an
    audit that found many changed), a refresh reads the windows in one pass and that many
    of the missing slices, so the slices fill over this many refreshes; 1: every missing
    slice at once (one row per slice and bucket: docs/metrics.md, "Time slices")."""
    slice_audit_interval: Duration = timedelta(hours=1)
    """How often the kept slices are compared with the store (one count per slice), so that
    rows written or deleted later than ``predictions.ingestion_delay`` are taken in."""
    bucket_decimals: int = Field(default=5, ge=1, le=5)
    """Windows are aggregated in ``FLOOR(score * 10**k)`` buckets, at most 10**k + 1 rows
    whatever the row count (so k <= 5 keeps a window's buckets in a few MB); a bucket of
    one distinct score keeps everything exact."""

    @field_validator("alert_thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        unknown = sorted(set(value) - set(AlertThresholds.model_fields))
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; known: {sorted(AlertThresholds.model_fields)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if len(set(self.windows)) != len(self.windows):
            raise ValueError(f"windows: duplicate window in {self.windows}")
        buckets = self.histogram_buckets
        if any(b <= a for a, b in zip(buckets, buckets[1:], strict=False)):
            raise ValueError("histogram_buckets: bounds must be strictly increasing")
        longest = max(parse_duration(window) for window in self.windows)
        width = self.slice_width()
        if width is not None and longest / width > MAX_SLICES:
            fewest = math.ceil((longest / MAX_SLICES).total_seconds())
            raise ValueError(
                f"time_slice: {width.total_seconds():g}s cuts the largest window into "
                f"{math.ceil(longest / width)} slices; at most {MAX_SLICES} (each is kept in memory and "
                f"named by a cold refresh's statement): make it at least {fewest}s"
            )
        return self

    def slice_width(self) -> timedelta | None:
        """The width of ``time_slice`` (``auto`` derived from the windows), ``None`` without."""
        return None if self.time_slice is None else self.label_slice_width()

    def label_slice_width(self) -> timedelta:
        """The width of the slices whose labels mature together (docs/metrics.md, *Label
        maturity*): ``time_slice``'s, or ``auto``'s when it is unset, so that a slice's online
        accuracy does not depend on whether slices are kept. ``auto``: the smallest window / 12
        or the largest / 288, whichever is longer, in whole seconds."""
        if isinstance(self.time_slice, timedelta):
            return self.time_slice
        durations = [parse_duration(window) for window in self.windows]
        derived = max(min(durations) / 12, max(durations) / 288)
        return timedelta(seconds=max(1, math.ceil(derived.total_seconds())))

    def replays_on_slices(self) -> bool:
        """Whether the replays keep time slices (docs/metrics.md, *Replays on slices*): the
        model has replays and ``time_slice``, and ``predictions.ingestion_delay`` +
        ``replay_delay`` is at most half the largest window (beyond, most of the window
        would be read at every refresh anyway, by a sliced statement that costs more than
        one pass)."""
        longest = max(parse_duration(window) for window in self.windows)
        settling = self.predictions.ingestion_delay + self.replay_delay
        return self.replays is not None and self.time_slice is not None and settling <= longest / 2

    def labels_mature_by_slice(self) -> bool:
        """Whether labels mature by time slice (docs/metrics.md, *Label maturity*): the model
        has labels with a timestamp and a ``label_delay`` above 0."""
        labels = self.labels
        return labels is not None and labels.columns.timestamp is not None and self.label_delay > timedelta(0)

    def sources(self) -> dict[str, TableSource]:
        """The configured sources by name (``predictions``, ``labels``, ``replays``)."""
        found = {"predictions": self.predictions, "labels": self.labels, "replays": self.replays}
        return {name: source for name, source in found.items() if source is not None}


class ApiSettings(Strict):
    """The training-run API. With a token (inline or from a file), every API request must
    carry ``Authorization: Bearer <token>``; without one, the API is open."""

    token: str | None = Field(default=None, repr=False, min_length=16)
    token_file: Path | None = None
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    body_timeout: Duration = timedelta(seconds=30)
    """A request body must arrive within this time (slow clients get 408)."""

    @model_validator(mode="after")
    def _one_token(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give at most one of 'token' or 'token_file'")
        if self.token_file is not None:
            # Checked here, not at first use: an empty file must not leave the API open.
            try:
                token = self.resolved_token() or ""
            except OSError as exc:
                raise ValueError(f"token_file: cannot read {self.token_file}: {exc.strerror}") from None
            if len(token) < 16:
                raise ValueError("token_file: the token must have at least 16 characters")
        return self

    def resolved_token(self) -> str | None:
        """The bearer token, reading ``token_file`` if that is how it was given.

        Raises:
            OSError: the file cannot be read.
        """
        if self.token_file is not None:
            return Path(self.token_file).read_text().strip()
        return self.token


class TrainingSettings(Strict):
    """How much training history is exported."""

    history_versions: int = Field(default=10, ge=2, le=100)
    """``mlmon_version_*`` series cover the newest this many versions of each model."""
    staleness: Duration = timedelta(hours=1)
    """How long the training metrics outlive a failing state database: they change once a
    version, so a short outage must not resolve and re-fire the training alerts."""
    max_features: int = Field(default=200, ge=1)
    """Per model, at most this many features get ``mlmon_training_feature_*`` series."""
    max_categories: int = Field(default=30, ge=1)
    """Per feature, at most this many categories (the largest shares) get a series."""
    max_models: int = Field(default=1000, ge=1)
    """The API refuses (409) a run of a new model once runs of this many models are stored:
    every model adds series to each scrape and work to each refresh."""


@dataclass(frozen=True)
class RefreshPolicy:
    """The slice of ``Settings`` a refresher needs: how often it runs (``interval``), how
    long one query may take (``query_timeout``), how long a failed source keeps its last
    values (``staleness``, resolved) and the configured ``refresh_timeout`` (``None``: each
    refresher derives its deadline)."""

    interval: timedelta
    query_timeout: timedelta
    staleness: timedelta
    refresh_timeout: timedelta | None

    def deadline(self, work: timedelta = timedelta(0)) -> timedelta:
        """How long a refresh may run before it is reported stalled: ``refresh_timeout``, or
        the longer of one interval plus one query timeout and ``work``, the longest the
        refresh may take when it works (``ModelRefresher.deadline`` gives a model's)."""
        if self.refresh_timeout is not None:
            return self.refresh_timeout
        return max(self.interval + self.query_timeout, work)


class Settings(Strict):
    """The whole configuration file."""

    refresh_interval: Duration = timedelta(seconds=60)
    query_timeout: Duration = timedelta(seconds=30)
    staleness: Duration | None = None
    """How long a failed source keeps its last values; default 3 refresh intervals."""
    refresh_timeout: Duration | None = None
    """A refresh still running after this is reported as stalled; default derived from the
    model's work (``exporter.predictions.refresh.ModelRefresher.deadline``)."""
    header_timeout: Duration = timedelta(seconds=10)
    """Every HTTP request's line and headers (and, with TLS, the handshake before them) must
    arrive within this (slow clients get 408)."""
    write_timeout: Duration = timedelta(seconds=30)
    """A response the client stops reading is dropped, and its connection closed, this long
    after the client first fell behind."""
    max_connections: int = Field(default=200, ge=1, le=100_000)
    """Connections (and requests in progress) served at once; beyond them, 503."""
    stores: dict[Identifier, Store]
    models: list[ModelConfig]
    state: Store = Store(url="sqlite:///mlmon-state.sqlite")
    """mlmon's own database (training runs); created and migrated by mlmon."""
    api: ApiSettings = ApiSettings()
    training: TrainingSettings = TrainingSettings()
    alerting: AlertThresholds = AlertThresholds()
    """Default alert thresholds of every model; ``models[].alert_thresholds`` overrides them."""

    def thresholds(self, model: str) -> dict[str, float]:
        """The model's effective alert thresholds (switched-off ones left out); a model
        that is not configured (known only from its training runs) gets the defaults."""
        overrides = next((m.alert_thresholds for m in self.models if m.name == model), {})
        merged = {**self.alerting.model_dump(), **overrides}
        return {name: value for name, value in merged.items() if value is not None}

    def reference_errors(self) -> list[str]:
        """Problems between sections, one ``"key.path: message"`` each: duplicate model
        names, unknown stores, labels or replays outside the predictions' store."""
        names = [m.name for m in self.models]
        errors = [
            f"models[{i}].name: duplicate model name {name!r}" for i, name in enumerate(names) if names.index(name) != i
        ]
        for i, model in enumerate(self.models):
            for source_name, source in model.sources().items():
                path = f"models[{i}].{source_name}.store"
                if source.store not in self.stores:
                    errors.append(f"{path}: unknown store {source.store!r} (stores: {', '.join(sorted(self.stores))})")
                elif (
                    source_name != "predictions"
                    and source.store != model.predictions.store
                    and model.predictions.store in self.stores  # else only the predictions' store is wrong
                ):
                    # Labels and replays are joined to the predictions in SQL, which needs one database.
                    errors.append(
                        f"{path}: must be the predictions store {model.predictions.store!r}, got {source.store!r} "
                        "(labels and replays are joined to predictions inside the database)"
                    )
            if model.features is not None and model.features.table is None:
                predictions = model.predictions.columns.model_dump().values()
                for kind in ("numeric", "categorical"):
                    names = getattr(model.features, kind)
                    known = sorted(set(names) & set(predictions)) if isinstance(names, list) else []
                    if known:
                        errors.append(
                            f"models[{i}].features.{kind}: {known} are the predictions' own columns, not features"
                        )
        return errors

    @property
    def staleness_period(self) -> timedelta:
        """``staleness``, or 3 refresh intervals."""
        return self.staleness if self.staleness is not None else 3 * self.refresh_interval

    @property
    def refresh_policy(self) -> RefreshPolicy:
        """The refresh settings, with ``staleness`` resolved (``staleness_period``)."""
        return RefreshPolicy(self.refresh_interval, self.query_timeout, self.staleness_period, self.refresh_timeout)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, path: str, errors: list[str]) -> Any:
    """Replace ``${VAR}`` in every string of a parsed YAML tree; report unset variables by key path."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", errors) for i, v in enumerate(node)]
    if isinstance(node, str):

        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                errors.append(f"{path}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV_REF.sub(substitute, node)
    return node


def parse_settings(data: Any) -> Settings:
    """Validate an already-parsed YAML document.

    Raises:
        ConfigError: with one message per problem, each naming its key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(["(top level): the config must be a mapping with 'stores' and 'models'"])
    unset: list[str] = []
    data = _expand_env(data, "", unset)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        # Every problem in one run: the unset variables and the rest, except what an unset
        # variable's empty value caused at its own key (reported once, as unset).
        unset_keys = {line.split(": ", 1)[0] for line in unset}
        others = [line for line in error_lines(exc.errors(), Settings) if line.split(": ", 1)[0] not in unset_keys]
        raise ConfigError(unset + others) from None
    errors = unset + settings.reference_errors()
    if errors:
        raise ConfigError(errors)
    return settings


def load_settings(path: str | Path) -> Settings:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: unreadable file, invalid YAML, or invalid content (key paths named).
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_error_line(path, exc)]) from None
    return parse_settings(data)
