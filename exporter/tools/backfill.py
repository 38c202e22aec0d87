"""``mlmon backfill``: Prometheus history from the stores (docs/backfill.md).

Every model is evaluated at each step ``from + k * step`` in ``[from, to)`` exactly as
``mlmon once --as-of`` computes it; the samples of each UTC day go to one OpenMetrics
file (``mlmon-<first>-<last>.om``, timestamps in seconds, families grouped, each series
sorted by time, ``# EOF``) that ``promtool tsdb create-blocks-from openmetrics`` turns
into TSDB blocks. A file is written whole or not at all (written aside, then renamed),
so a run cut short is continued by running it again: the instants inside the span of an
existing file are not evaluated twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from exporter.config import Settings
from exporter.predictions.refresh import model_refreshers
from exporter.predictions.stores import INSTANT_RANGE, Stores
from exporter.server.collector import METRICS, MlmonCollector
from exporter.snapshot import SnapshotStore
from exporter.training.metrics import TrainingRefresher
from exporter.training.storage import StateDatabase

log = logging.getLogger(__name__)

#: Sample names of the series about the exporter process (``MetricSpec.history`` False):
#: in backfilled history they would describe the backfill run, so they are left out.
NOT_HISTORY = frozenset(name for name, spec in METRICS.items() if not spec.history)
_FILE = re.compile(r"^mlmon-(\d{8}T\d{6}Z)-(\d{8}T\d{6}Z)\.om$")
_STAMP = "%Y%m%dT%H%M%SZ"
#: Marker beside a file that promtool has turned into blocks of the data directory it names.
IMPORTED = ".imported"


def with_time_slices(settings: Settings) -> Settings:
    """``settings`` with ``time_slice: auto`` for every model that sets none (a model's own
    ``time_slice`` is kept). A backfill walks forward in time over sealed history, the case
    time slices are made for: after the first step, each reads the slices sealed since the
    previous one and each window's head and tail rather than every window (docs/backfill.md,
    *Cost per step*)."""
    models = [m if m.time_slice is not None else m.model_copy(update={"time_slice": "auto"}) for m in settings.models]
    return settings.model_copy(update={"models": models})


class BackfillError(Exception):
    """The backfill cannot go on; the message says why and what to do."""


class OverlapError(BackfillError):
    """The Prometheus data directory already holds some of the series in the range."""


class ManifestError(BackfillError):
    """``--output`` holds files computed with another step, other target labels or other
    models than this run's."""


#: The file of ``--output`` recording what its files were computed with.
MANIFEST = "mlmon-backfill.json"


class Evaluator:
    """Evaluates every model, and its training runs, at increasing instants.

    The one seam between the backfill and the refresh machinery: each ``evaluate`` is a
    refresh of the same refreshers at a later instant, so reflection is cached across
    steps, the counters are fed incrementally, and with ``time_slice`` set (``mlmon backfill``
    sets it: ``with_time_slices``) the kept time slices of the predictions, of the labels
    that mature by slice and of the replays on slices (each source's ``slices``) are
    reused: once filled, a step reads the slices sealed since the previous one and each
    window's head and tail, not the windows (they are not saved in the state database, which
    ``mlmon serve``'s kept slices stay in). It computes what ``mlmon once --as-of`` does at
    each instant with the same settings (docs/metrics.md, "Time slices").
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._stores = Stores(settings.stores, settings.query_timeout)
        self._state = StateDatabase(settings.state.resolved_url(), settings.query_timeout.total_seconds())
        # The counters count every prediction stamped before the step's horizon, from the
        # first instant a store can hold: the same value at an instant whatever range or
        # resumed run computed it (docs/backfill.md).
        self._refreshers = model_refreshers(
            settings.models,
            settings.refresh_policy,
            self._stores,
            count_from=INSTANT_RANGE[0],
            training=settings.training,
            state=self._state,
        )
        self._training = TrainingRefresher(self._state, settings.training, settings.refresh_policy)
        self._last: datetime | None = None

    def evaluate(self, at: datetime) -> list[Metric]:
        """The metric families of every model at ``at`` (timezone-aware, later than the
        previous call's), as ``mlmon once --as-of`` prints them, without ``NOT_HISTORY``.

        Raises:
            BackfillError: a source or the state database failed at ``at``, or a model's
                training runs give no metrics: history with a hole would pass for data.
        """
        if self._last is not None and at <= self._last:
            raise ValueError(f"instants must increase: {at.isoformat()} after {self._last.isoformat()}")
        self._last = at
        store = SnapshotStore([m.name for m in self.settings.models])
        for refresher in self._refreshers:
            snapshot = refresher.refresh(at)
            failed = sorted(name for name, status in snapshot.sources.items() if not status.up)
            if failed:
                raise BackfillError(
                    f"at {at.isoformat()}: model {snapshot.model!r}: source(s) {', '.join(failed)} failed (see the log "
                    "above); fix the store or take the model out of the config, then run the same command again"
                )
            store.put(snapshot)
        # The state database holds every model's runs: keep the configured ones, as the
        # overlap check selects them (another config's models are another backfill's).
        configured = {m.name for m in self.settings.models}
        training = self._training.refresh(at)
        training = replace(
            training,
            models={k: v for k, v in training.models.items() if k in configured},
            model_errors={k: v for k, v in training.model_errors.items() if k in configured},
        )
        if not training.up:
            raise BackfillError(f"at {at.isoformat()}: reading the state database failed (see the log above)")
        if bad := sorted(model for model, count in training.model_errors.items() if count):
            raise BackfillError(
                f"at {at.isoformat()}: the training runs of model(s) {', '.join(bad)} give no metrics (see the log "
                "above); delete or replace the bad run, then run the same command again"
            )
        store.put_training(training)
        families = []
        for family in MlmonCollector(store, self.settings.thresholds).collect():
            family.samples = [s for s in family.samples if s.name not in NOT_HISTORY]
            if family.samples:
                families.append(family)
        return families

    def close(self) -> None:
        """Close every connection."""
        self._stores.dispose()
        self._state.engine.dispose()


class Chunk:
    """The samples of several instants, grouped by family, with the target labels added."""

    def __init__(self, labels: Mapping[str, str]):
        self._labels = dict(labels)
        self._families: dict[str, Metric] = {}
        self.instants: list[datetime] = []

    def add(self, at: datetime, families: list[Metric]) -> None:
        """Add the samples of ``families``, stamped ``at``."""
        self.instants.append(at)
        seconds = at.timestamp()
        for family in families:
            into = self._families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples.extend(
                s._replace(labels={**self._labels, **s.labels}, timestamp=seconds) for s in family.samples
            )

    def collect(self) -> list[Metric]:
        """The families, each series in time order (promtool appends a series' samples in
        the order read and refuses one older than the previous), a histogram's buckets,
        count and sum of one instant together."""
        rank = {"_bucket": 0, "_count": 1, "_sum": 2}
        for family in self._families.values():
            n = len(family.name)
            family.samples.sort(
                key=lambda s: (
                    sorted((k, v) for k, v in s.labels.items() if k != "le"),
                    s.timestamp,
                    rank.get(s.name[n:], 3),  # noqa: B023 (sorted here, within the iteration)
                    float(s.labels.get("le", "0")),
                )
            )
        return sorted(self._families.values(), key=lambda f: f.name)

    def write(self, directory: Path) -> Path:
        """Write the OpenMetrics file of the chunk into ``directory`` (whole or not at all)."""
        first, last = self.instants[0], self.instants[-1]
        path = directory / f"mlmon-{first.strftime(_STAMP)}-{last.strftime(_STAMP)}.om"
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as file:
            file.write(openmetrics(self))
            # A finished file's name marks its steps done: its bytes must be on disk before
            # the name is (a power loss would otherwise leave an empty "done" file).
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
        return path


def covered(directory: Path) -> list[tuple[datetime, datetime, Path]]:
    """``(first, last, path)`` of every finished file of ``directory``: the instants in
    ``[first, last]`` are done."""
    spans = []
    for path in sorted(directory.glob("mlmon-*.om")):
        if match := _FILE.match(path.name):
            first, last = (datetime.strptime(s, _STAMP).replace(tzinfo=UTC) for s in match.groups())
            spans.append((first, last, path))
    return spans


def pending(start: datetime, end: datetime, step: timedelta, done: list[tuple[datetime, datetime, Path]]) -> list:
    """The instants ``start + k * step`` in ``[start, end)`` outside every span of ``done``."""
    if step <= timedelta(0):
        raise BackfillError("--step must be positive")
    out = []
    at = start
    while at < end:
        if not any(first <= at <= last for first, last, _ in done):
            out.append(at)
        at += step
    return out


def by_day(instants: list[datetime]) -> list[list[datetime]]:
    """``instants`` in runs of one UTC day each: one file, a few TSDB blocks of promtool's 2 h."""
    days: dict = {}
    for at in instants:
        days.setdefault(at.date(), []).append(at)
    return list(days.values())


def clashing_label(name: str) -> bool:
    """Whether a target label ``name`` (``--label``) would clash with a label of mlmon's own
    series (``model``, ``window``, ..., the histogram's ``le``) or is reserved by Prometheus
    (``__`` prefix): in a sample the series' own label would win, and the target's be lost
    silently (a scrape would rename the series' label to ``exported_<name>`` instead)."""
    own = {label for spec in METRICS.values() for label in spec.labels} | {"le"}
    return name in own or name.startswith("__")


def promtool_command(promtool: str, path: Path, data: Path) -> list[str]:
    """The promtool command that turns the OpenMetrics file ``path`` into blocks in ``data``."""
    return [promtool, "tsdb", "create-blocks-from", "openmetrics", str(path), str(data)]


def series_selector(settings: Settings, labels: Mapping[str, str]) -> str:
    """The PromQL selector of mlmon's per-model series the backfill writes."""
    models = _escape("|".join(re.escape(m.name) for m in settings.models))
    matchers = ['__name__=~"mlmon_.+"', f'model=~"{models}"'] + [
        f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())
    ]
    return "{" + ",".join(matchers) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def runs(instants: list[datetime], step: timedelta) -> list[tuple[datetime, datetime]]:
    """``(first, last)`` of each run of consecutive instants (``step`` apart)."""
    out: list[tuple[datetime, datetime]] = []
    for at in instants:
        if out and at - out[-1][1] == step:
            out[-1] = (out[-1][0], at)
        else:
            out.append((at, at))
    return out


def existing_samples(promtool: str, data: Path, selector: str, first: datetime, last: datetime) -> str | None:
    """The first sample line ``promtool tsdb dump`` prints for ``selector`` in ``[first,
    last]`` from the blocks and the write-ahead log of ``data``, or ``None``.

    Raises:
        BackfillError: promtool failed.
    """
    command = [
        promtool,
        "tsdb",
        "dump",
        f"--min-time={int(first.timestamp() * 1000)}",
        f"--max-time={int(last.timestamp() * 1000)}",
        f"--match={selector}",
        str(data),
    ]
    # stderr to a file, not a pipe: promtool logs there while it reads the write-ahead log,
    # and a full stderr pipe nobody drains would block it before its first line of stdout.
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, text=True
        ) as process,
    ):
        assert process.stdout is not None
        line = process.stdout.readline()  # one is enough: the dump of a large range is large
        if line:
            process.kill()
            return line.strip()
        if process.wait() != 0:
            errors.seek(0)
            error = errors.read().strip()[-2000:]
            raise BackfillError(f"{shlex.join(command)} failed: {error or process.returncode}")
    return None


@dataclass
class Backfill:
    """One ``mlmon backfill`` run: ``[start, end)`` every ``step`` into ``output``, and
    into the Prometheus data directory ``data`` when given (with ``promtool``)."""

    settings: Settings
    start: datetime
    end: datetime
    step: timedelta
    output: Path
    labels: Mapping[str, str]
    data: Path | None = None
    promtool: str | None = None
    imported: list[Path] = field(default_factory=list, init=False)
    """The files this run turned into blocks of ``data``."""

    def check_manifest(self) -> None:
        """Record in ``output`` what its files are computed with (step, target labels,
        models, their time slices), or refuse a run that differs: the files' names are the
        record of what is done, so a run with another grid, labels or models would take the
        old files for its own and import them as they are, and one with other time slices
        would mix the two meanings of the mode share (docs/backfill.md, *Numbers*). A
        manifest without time slices (written before they were recorded) had none.

        Raises:
            ManifestError: naming the option and both values.
        """
        path = self.output / MANIFEST
        mine = {
            "step_seconds": int(self.step.total_seconds()),
            "labels": dict(sorted(self.labels.items())),
            "models": sorted(m.name for m in self.settings.models),
            "time_slice_seconds": {
                m.name: None if (width := m.slice_width()) is None else width.total_seconds()
                for m in sorted(self.settings.models, key=lambda m: m.name)
            },
        }
        if not path.exists():
            path.write_text(json.dumps(mine, indent=2) + "\n")
            return
        theirs = json.loads(path.read_text())
        theirs.setdefault("time_slice_seconds", dict.fromkeys(theirs.get("models", [])))
        options = (
            ("step_seconds", "--step (seconds)"),
            ("labels", "--label"),
            ("models", "models"),
            ("time_slice_seconds", "time slices (--time-slices/--no-time-slices, or the models' time_slice)"),
        )
        for key, option in options:
            if theirs.get(key) != mine[key]:
                raise ManifestError(
                    f"{self.output} holds files computed with {option} {theirs.get(key)!r}, this run has "
                    f"{mine[key]!r}: run with the same {option}, or give a new --output (to import into the same "
                    "data directory, the overlap check then applies)"
                )

    def check_overlap(self, spans: list[tuple[datetime, datetime]]) -> None:
        """Refuse the ``(first, last)`` spans in which ``data`` already holds one of the
        per-model series written. (``mlmon_state_up``, without a model label, is 1 at every
        backfilled step: a second backfill's samples of it equal the first's.)

        Raises:
            OverlapError: naming the first existing sample and what to do.
        """
        if self.data is None or not self.data.exists() or not spans:
            return
        assert self.promtool is not None
        # promtool's dump refuses a directory without a write-ahead log (one promtool wrote,
        # never served); Prometheus creates the same empty directory when it starts.
        (self.data / "wal").mkdir(exist_ok=True)
        selector = series_selector(self.settings, self.labels)
        for first, last in spans:
            line = existing_samples(self.promtool, self.data, selector, first, last)
            if line is not None:
                raise OverlapError(
                    f"{self.data} already holds mlmon series between {first.isoformat()} and {last.isoformat()}, "
                    f"e.g. {line} (a sample's time in ms after its value). Prometheus keeps one value per series "
                    "and instant and would mix the two histories: backfill only the time before the existing "
                    "data (an earlier --to), or give other target labels (--label), or delete those series "
                    "first (the admin API's delete_series, then clean_tombstones)"
                )

    def import_file(self, path: Path) -> None:
        """Turn ``path`` into blocks of ``data`` once (a marker file beside it names ``data``).

        Raises:
            BackfillError: promtool failed; its message is given.
        """
        if not self.needs_import(path):
            return
        assert self.data is not None and self.promtool is not None  # needs_import: data is set
        command = promtool_command(self.promtool, path, self.data)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BackfillError(f"{shlex.join(command)} failed:\n{(done.stderr or done.stdout)[-2000:]}")
        path.with_name(path.name + IMPORTED).write_text(f"{self.data.resolve()}\n")
        self.imported.append(path)

    def needs_import(self, path: Path) -> bool:
        """Whether ``path`` is still to be turned into blocks of ``data`` (its marker names
        no other directory, or there is none)."""
        if self.data is None:
            return False
        marker = path.with_name(path.name + IMPORTED)
        return not (marker.exists() and marker.read_text().strip() == str(self.data.resolve()))

    def pending(self) -> list[datetime]:
        """The instants still to evaluate: those of no finished file of ``output``."""
        return pending(self.start, self.end, self.step, covered(self.output))

    def run(self, todo: list[datetime], progress: Callable[[int], object]) -> list[Path]:
        """Evaluate the instants ``todo`` (``pending``), write a file per UTC day, import the files.

        ``progress(advance)`` is called once per instant evaluated.

        Returns: every finished file of ``output`` (those of earlier runs included).
        Raises:
            BackfillError: an overlap with ``data`` (``OverlapError``), files of ``output``
                computed otherwise (``ManifestError``), a failed source, a failed promtool.
        """
        self.check_manifest()
        # Files written by a run stopped before promtool (or without --prometheus-data) are
        # imported too: their spans are checked like the instants still to evaluate.
        unimported = [(first, last, path) for first, last, path in covered(self.output) if self.needs_import(path)]
        self.check_overlap(runs(todo, self.step) + [(first, last) for first, last, _ in unimported])
        for _, _, path in unimported:
            self.import_file(path)
        evaluator = Evaluator(self.settings)
        try:
            for day in by_day(todo):
                chunk = Chunk(self.labels)
                for at in day:
                    chunk.add(at, evaluator.evaluate(at))
                    progress(1)
                self.import_file(chunk.write(self.output))
        finally:
            evaluator.close()
        return [p for _, _, p in covered(self.output)]
