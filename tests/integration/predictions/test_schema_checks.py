"""Schema mismatches are found by check-config, not by every refresh (issue 11, section 5):
id columns of different kinds joined by '=', and filter values YAML typed otherwise than
their column (docs/configuration.md, "Types of ids and filter values").
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from exporter.cli import app
from exporter.config import load_settings
from exporter.predictions.refresh import ModelRefresher
from exporter.predictions.stores import Stores, reflect_table, time_column, timestamp_types
from exporter.reasons import classify_error

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
#: (id, minute after 11:00, score, label, market, model_version, shard, active, weight)
ROWS = [
    (1, 1, 0.2, 0, "NO", "1.10", 3, True, 1.0),
    (2, 2, 0.4, 0, "NO", "1.1", 3, False, 2.0),
    (3, 3, 0.6, 1, "SE", "1.10", 2, True, 1.0),
    (4, 4, 0.8, 1, "NO", "1.10", 2, True, 0.5),
    (5, 5, 0.3, 1, "DK", "1.2", 3, False, 1.0),
    (6, 6, 0.7, 0, "NO", "1.10", 3, True, 1.0),
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), "duckdb"])
def store(request, tmp_path):
    """(url, schema, dialect) of an empty store."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite", None, "sqlite"
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path}/store.duckdb", None, "duckdb"
    return (*request.getfixturevalue("postgres_schema"), "postgresql")


def _tables(url: str, schema: str | None, id_types: dict[str, str], ids: dict[str, list] | None = None) -> None:
    """predictions, labels and replays with ``ROWS``; ``id_types``: table -> SQL type of its id
    column; ``ids``: table -> the id values stored (default: ``ROWS``' ids)."""
    q = (lambda t: f'"{schema}".{t}') if schema else (lambda t: t)
    ids = {table: ids.get(table) if ids else None for table in ("predictions", "labels", "replays")}
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {q('predictions')} (id {id_types['predictions']}, ts TIMESTAMP, p DOUBLE PRECISION, "
                "market VARCHAR(8), model_version TEXT, shard INTEGER, active BOOLEAN, weight REAL)"
            )
        )
        conn.execute(sa.text(f"CREATE TABLE {q('labels')} (id {id_types['labels']}, y INTEGER)"))
        conn.execute(sa.text(f"CREATE TABLE {q('replays')} (id {id_types['replays']}, p DOUBLE PRECISION)"))
        for k, (i, minute, score, label, market, version, shard, active, weight) in enumerate(ROWS):
            values = {table: (ids[table][k] if ids[table] else i) for table in ids}
            # PostgreSQL stores no integer parameter in a text column: give text ids as text.
            values = {t: str(v) if "CHAR" in id_types[t] or "TEXT" in id_types[t] else v for t, v in values.items()}
            conn.execute(
                sa.text(f"INSERT INTO {q('predictions')} VALUES (:i, :ts, :p, :m, :v, :s, :a, :w)"),
                {
                    "i": values["predictions"],
                    "ts": datetime(2024, 6, 1, 11, minute),
                    "p": score,
                    "m": market,
                    "v": version,
                    "s": shard,
                    "a": active,
                    "w": weight,
                },
            )
            conn.execute(sa.text(f"INSERT INTO {q('labels')} VALUES (:i, :y)"), {"i": values["labels"], "y": label})
            conn.execute(sa.text(f"INSERT INTO {q('replays')} VALUES (:i, :p)"), {"i": values["replays"], "p": score})
    engine.dispose()


def _config(tmp_path, url: str, schema: str | None, filter_yaml: str = "{}", replays: bool = True):
    """Write the config file; ``filter_yaml`` is pasted into it as written, so YAML types its values."""
    source = {"store": "s", **({"schema": schema} if schema else {})}
    model = {
        "name": "ctr",
        "windows": ["1h"],
        "label_delay": "0s",
        "predictions": {
            **source,
            "table": "predictions",
            "columns": {"id": "id", "timestamp": "ts", "score": "p"},
            "filter": "FILTER",
        },
        "labels": {**source, "table": "labels", "columns": {"id": "id", "label": "y"}},
    }
    if replays:
        model["replays"] = {**source, "table": "replays", "columns": {"id": "id", "score": "p"}}
    text = yaml.safe_dump({"stores": {"s": {"url": url}}, "models": [model]})
    assert text.count("filter: FILTER\n") == 1
    path = tmp_path / "mlmon.yml"
    path.write_text(text.replace("filter: FILTER\n", f"filter: {filter_yaml}\n"))
    return path


def _check_config(path):
    return CliRunner().invoke(app, ["check-config", "--config", str(path)])


def _refresh(path):
    settings = load_settings(path)
    stores = Stores(settings.stores, settings.query_timeout)
    try:
        return ModelRefresher(settings.models[0], "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
    finally:
        stores.dispose()


def _errors(snap) -> dict:
    return {key: n for key, n in snap.errors.items() if n}


# -- ids of different kinds ----------------------------------------------------------------

ID_MISMATCHES = {
    # (dialect or None for all, predictions id type, labels id type, replays id type, bad sources)
    "bigint-text": (None, "BIGINT", "TEXT", "BIGINT", ["labels"]),
    "bigint-varchar-replays": (None, "BIGINT", "BIGINT", "VARCHAR(20)", ["replays"]),
    "text-integer-both": (None, "TEXT", "INTEGER", "INTEGER", ["labels", "replays"]),
    "uuid-text": ("postgresql", "UUID", "TEXT", "UUID", ["labels"]),
    "uuid-bigint": ("postgresql", "UUID", "UUID", "BIGINT", ["replays"]),
}


@pytest.mark.parametrize("case", list(ID_MISMATCHES))
def test_ids_of_different_kinds_are_a_schema_error_in_check_config_and_in_every_refresh(case, store, tmp_path):
    only, predictions_type, labels_type, replays_type, bad = ID_MISMATCHES[case]
    url, schema, dialect = store
    if only is not None and dialect != only:
        pytest.skip(f"{only} only")
    uuids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 7)]
    ids = None
    if "UUID" in predictions_type:
        numbers = [r[0] for r in ROWS]
        ids = {
            t: (uuids if typ in ("UUID", "TEXT") else numbers)
            for t, typ in (("predictions", predictions_type), ("labels", labels_type), ("replays", replays_type))
        }
    _tables(url, schema, {"predictions": predictions_type, "labels": labels_type, "replays": replays_type}, ids)
    path = _config(tmp_path, url, schema)

    result = _check_config(path)
    assert result.exit_code == 2, result.output
    for source in bad:  # check-config reports every problem in one run
        line = next(line for line in result.output.splitlines() if f"models[0].{source}.columns.id:" in line)
        # both types named, and what to do
        source_type = {"labels": labels_type, "replays": replays_type}[source]
        assert source_type.split("(")[0] in line.upper() and predictions_type in line.upper(), line
        assert "ids are joined with '='" in line and "change one column's type" in line
    assert "Traceback" not in result.output

    snap = _refresh(path)
    # The predictions need no join: they stay up; each mismatched source is down for the schema.
    expected_up = {"predictions": True, "labels": "labels" not in bad, "replays": "replays" not in bad}
    assert {name: s.up for name, s in snap.sources.items()} == expected_up
    assert _errors(snap) == {(source, "schema"): 1 for source in bad}
    assert snap.score_stats[0].predictions == len(ROWS)


def test_a_missing_label_column_and_a_mismatched_id_kind_show_in_one_run(store, tmp_path):
    """Issue B6: the id kind is checked even when the labels table has other column problems."""
    url, schema, _ = store
    _tables(url, schema, {"predictions": "BIGINT", "labels": "TEXT", "replays": "BIGINT"})
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {f'{schema}.' if schema else ''}labels RENAME COLUMN y TO y_renamed"))
    engine.dispose()
    result = _check_config(_config(tmp_path, url, schema))
    assert result.exit_code == 2, result.output
    assert "models[0].labels.columns.label: column 'y' does not exist" in result.output
    assert "models[0].labels.columns.id: column 'id'" in result.output and "ids are joined with '='" in result.output
    assert "models[0].replays" not in result.output


ID_MATCHES = {
    # (dialect or None for all, predictions id type, labels id type, replays id type)
    "bigint-integer": (None, "BIGINT", "INTEGER", "SMALLINT"),
    "bigint-numeric": (None, "BIGINT", "NUMERIC(20, 0)", "DECIMAL(18, 0)"),
    "text-varchar": (None, "TEXT", "VARCHAR(20)", "CHAR(1)"),
    "uuid-uuid": ("postgresql", "UUID", "UUID", "UUID"),
}


@pytest.mark.parametrize("case", list(ID_MATCHES))
def test_ids_of_one_kind_join(case, store, tmp_path):
    only, predictions_type, labels_type, replays_type = ID_MATCHES[case]
    url, schema, dialect = store
    if only is not None and dialect != only:
        pytest.skip(f"{only} only")
    ids = None
    if predictions_type == "UUID":
        uuids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 7)]
        ids = dict.fromkeys(("predictions", "labels", "replays"), uuids)
    _tables(url, schema, {"predictions": predictions_type, "labels": labels_type, "replays": replays_type}, ids)
    path = _config(tmp_path, url, schema)
    result = _check_config(path)
    assert result.exit_code == 0, result.output

    snap = _refresh(path)
    assert all(s.up for s in snap.sources.values()) and not _errors(snap), _errors(snap)
    scores = np.array([r[2] for r in ROWS])
    labels = np.array([r[3] for r in ROWS])
    online = snap.online[0]
    assert online.labeled == len(ROWS)
    assert online.roc_auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert online.logloss == pytest.approx(log_loss(labels, scores), rel=1e-12)
    assert snap.replays[0].replayed == len(ROWS) and snap.replays[0].ratio == 1.0


def test_sqlite_would_match_text_ids_to_integers_by_affinity_which_is_why_they_are_refused(tmp_path):
    # What SQLite does with INTEGER = TEXT ids: it converts the text to a number, so '02'
    # and ' 3' match 2 and 3, where PostgreSQL refuses the comparison and a text
    # comparison would match neither. One config must not mean three things.
    engine = sa.create_engine(f"sqlite:///{tmp_path}/s.sqlite")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER)"))
        conn.execute(sa.text("CREATE TABLE l (id TEXT)"))
        conn.execute(sa.text("INSERT INTO p VALUES (1), (2), (3)"))
        conn.execute(sa.text("INSERT INTO l VALUES ('1'), ('02'), (' 3')"))
        matched = conn.execute(sa.text("SELECT count(*) FROM p JOIN l ON p.id = l.id")).scalar()
    engine.dispose()
    assert matched == 3


# -- filter values typed by YAML -----------------------------------------------------------

#: (filter as written in YAML, key named, words of the message)
BAD_FILTERS = {
    "no-read-as-false": ("{market: NO}", "market", ["the boolean false", "VARCHAR", "in quotes"]),
    "version-read-as-number": ("{model_version: 1.10}", "model_version", ["the number 1.1", "TEXT", "in quotes"]),
    "octal-read-as-number": ("{model_version: 007}", "model_version", ["the number 7", "in quotes"]),
    "text-in-integer-column": ('{shard: "3"}', "shard", ["the text '3'", "INTEGER", "without quotes"]),
    "fraction-in-integer-column": ("{shard: 2.5}", "shard", ["the number 2.5", "write an integer"]),
    "number-in-boolean-column": ("{active: 1}", "active", ["the number 1", "BOOLEAN", "true or false"]),
    "boolean-in-number-column": ("{weight: on}", "weight", ["the boolean true", "REAL", "without quotes"]),
    "boolean-in-integer-column": ("{shard: yes}", "shard", ["the boolean true", "INTEGER", "without quotes"]),
    "text-in-boolean-column": ("{active: 'true'}", "active", ["the text 'true'", "BOOLEAN", "true or false"]),
    "timestamp-column": (
        '{ts: "2024-06-01 11:01:00"}',
        "ts",
        ["filters compare text, number, boolean or uuid columns only"],
    ),
}


@pytest.mark.postgres
@pytest.mark.parametrize(
    "value, words",
    [
        ('"00000000-0000-4000-8000-000000000001"', None),
        ('"0000-1"', ["the text '0000-1'", "UUID", "which this text is not"]),
        ("1", ["the number 1"]),
    ],
)
def test_a_uuid_column_is_filtered_by_a_uuid_written_as_text(value, words, postgres_schema, tmp_path):
    url, schema = postgres_schema
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'ALTER TABLE "{schema}".predictions ADD COLUMN tenant uuid'))
        conn.execute(
            sa.text(
                f"UPDATE \"{schema}\".predictions SET tenant = CAST('00000000-0000-4000-8000-00000000000' || (id % 2) AS uuid)"
            )
        )
    engine.dispose()
    result = _check_config(_config(tmp_path, url, schema, f"{{tenant: {value}}}", replays=False))
    if words is None:
        assert result.exit_code == 0, result.output
        snap = _refresh(tmp_path / "mlmon.yml")
        assert snap.score_stats[0].predictions == 3 and not _errors(snap)  # ids 1, 3, 5
        return
    assert result.exit_code == 2
    line = next(line for line in result.output.splitlines() if "models[0].predictions.filter.tenant:" in line)
    assert all(word.lower() in line.lower() for word in words), line


@pytest.mark.parametrize("case", list(BAD_FILTERS))
@pytest.mark.long
def test_a_filter_value_that_does_not_fit_its_column_is_a_schema_error_naming_the_key(case, store, tmp_path):
    filter_yaml, key, words = BAD_FILTERS[case]
    url, schema, _ = store
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    path = _config(tmp_path, url, schema, filter_yaml, replays=False)

    result = _check_config(path)
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if f"models[0].predictions.filter.{key}:" in line)
    for word in words:
        assert word.lower() in line.lower(), line

    snap = _refresh(path)
    # Every source reads the predictions through the filter: all down, for the schema.
    assert {name: s.up for name, s in snap.sources.items()} == {"predictions": False, "labels": False}
    assert _errors(snap) == {("predictions", "schema"): 1, ("labels", "schema"): 1}


#: (filter as written in YAML, the ROWS it keeps, by hand)
GOOD_FILTERS = {
    "quoted-no": ('{market: "NO"}', [1, 2, 4, 6]),
    "quoted-version": ("{model_version: '1.10'}", [1, 3, 4, 6]),
    "both": ("{market: 'NO', model_version: '1.10'}", [1, 4, 6]),
    "integer": ("{shard: 3}", [1, 2, 5, 6]),
    "boolean-yes": ("{active: yes}", [1, 3, 4, 6]),
    "boolean-false": ("{active: false, shard: 3}", [2, 5]),
    "integer-in-real-column": ("{weight: 1}", [1, 3, 5, 6]),
    "fraction-in-real-column": ("{weight: 0.5}", [4]),
}


@pytest.mark.parametrize("case", list(GOOD_FILTERS))
@pytest.mark.long
def test_filter_values_that_fit_their_column_select_exactly_their_rows(case, store, tmp_path):
    filter_yaml, kept = GOOD_FILTERS[case]
    url, schema, _ = store
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    path = _config(tmp_path, url, schema, filter_yaml, replays=False)
    result = _check_config(path)
    assert result.exit_code == 0 and "warning" not in result.output, result.output

    snap = _refresh(path)
    assert all(s.up for s in snap.sources.values()) and not _errors(snap), _errors(snap)
    rows = [r for r in ROWS if r[0] in kept]
    scores = np.array([r[2] for r in rows])
    assert snap.score_stats[0].predictions == len(kept)
    assert snap.score_stats[0].mean == pytest.approx(scores.mean(), rel=1e-12)
    assert snap.online[0].labeled == len(kept)
    labels = [r[3] for r in rows]
    if len(set(labels)) == 2:
        assert snap.online[0].roc_auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_a_filter_that_matches_no_row_is_warned_about(store, tmp_path):
    """A filter value that fits its column but matches no row (a typo: NOR for NO) passes
    the checks, and the model would export no predictions with every source up:
    check-config warns naming the key (exit 0: rows may come later); not for an empty table."""
    url, schema, _ = store
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    result = _check_config(_config(tmp_path, url, schema, '{market: "NOR"}', replays=False))
    assert result.exit_code == 0, result.output
    assert "warning: models[0].predictions.filter: no row of table 'predictions' matches {'market': 'NOR'}" in (
        result.output
    )
    q = (lambda t: f'"{schema}".{t}') if schema else (lambda t: t)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {q('predictions')}"))
    engine.dispose()
    result = _check_config(_config(tmp_path, url, schema, '{market: "NOR"}', replays=False))
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_the_no_match_search_gives_up_at_query_timeout(tmp_path):
    """Attack 2026-12-01: the search for a matching row ran without ``query_timeout``, so
    check-config scanned a huge table with no match for minutes. Here a view of 10^9 rows:
    the search is cancelled after 1 s and nothing is warned (no guess)."""
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE base (id INTEGER, ts TIMESTAMP, p REAL, m TEXT)"))
        conn.execute(
            sa.text("INSERT INTO base VALUES (:i, '2024-06-01 11:01:00', 0.5, 'a')"), [{"i": i} for i in range(1000)]
        )
        conn.execute(
            sa.text(
                "CREATE VIEW predictions AS SELECT a.id AS id, a.ts AS ts, a.p AS p, a.m || b.m || c.m AS region "
                "FROM base a, base b, base c"
            )
        )
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER)"))
    engine.dispose()
    config = _config(tmp_path, url, None, '{region: "xx"}', replays=False)
    config.write_text(config.read_text() + "query_timeout: 1s\n")
    started = time.monotonic()
    result = _check_config(config)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert time.monotonic() - started < 15


def test_a_text_filter_on_an_untyped_sqlite_column_matches_every_storage_class_and_keeps_its_index(tmp_path):
    """Review 2026-12-01: ``CAST(model AS TEXT) = '3'`` alone made SQLite scan the table past
    the (model, ts) index a shared table has; the forms the text can be stored as go first,
    in an IN the index serves. What reads as '3' matches: 3, '3', x'33'; 3.0 reads '3.0'."""
    from exporter.predictions.stores import filter_condition

    engine = sa.create_engine(f"sqlite:///{tmp_path}/s.sqlite")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER, ts TIMESTAMP, model)"))
        conn.execute(sa.text("CREATE INDEX p_model_ts ON p (model, ts)"))
        stored = [3, "3", 3.0, b"3", "03", " 3", "a", 2**63 - 1]
        conn.execute(
            sa.text("INSERT INTO p VALUES (:i, '2024-06-01 11:00:00', :m)"),
            [{"i": i, "m": m} for i, m in enumerate(stored)],
        )
        table = sa.Table("p", sa.MetaData(), autoload_with=conn)
        where = lambda value: (filter_condition(table.c.model, value, "sqlite"), table.c.ts > "2024")  # noqa: E731
        matched = {
            v: conn.execute(sa.select(table.c.id).where(*where(v))).scalars().all()
            for v in ("3", "3.0", "a", str(2**63 - 1), "1" * 30)
        }
        compiled = (
            sa.select(table.c.id)
            .where(*where("3"))
            .compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        )
        plan = conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}", tuple(compiled.params[name] for name in compiled.positiontup or ())
        ).all()
    engine.dispose()
    assert matched == {"3": [0, 1, 3], "3.0": [2], "a": [6], str(2**63 - 1): [7], "1" * 30: []}
    assert any("USING INDEX p_model_ts (model=? AND ts>?)" in row[-1] for row in plan), plan


@pytest.mark.postgres
def test_a_filter_value_outside_a_postgresql_enum_is_a_schema_error_listing_its_labels(postgres_schema, tmp_path):
    """Attack 2026-12-01: ``{region: "EU"}`` on an enum of 'eu' and 'us' passed check-config,
    and PostgreSQL refused it ("invalid input value for enum") at every refresh."""
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TYPE \"{schema}\".region AS ENUM ('eu', 'us')"))
        conn.execute(
            sa.text(
                f'CREATE TABLE "{schema}".predictions (id BIGINT, ts TIMESTAMP, p DOUBLE PRECISION, region "{schema}".region)'
            )
        )
        conn.execute(sa.text(f'CREATE TABLE "{schema}".labels (id BIGINT, y INTEGER)'))
        conn.execute(
            sa.text(f"INSERT INTO \"{schema}\".predictions VALUES (1, :ts, 0.2, 'eu'), (2, :ts, 0.6, 'us')"),
            {"ts": datetime(2024, 6, 1, 11, 1)},
        )
    engine.dispose()
    result = _check_config(_config(tmp_path, url, schema, '{region: "EU"}', replays=False))
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if "models[0].predictions.filter.region:" in line)
    assert "YAML read the text 'EU'" in line and "only its labels 'eu', 'us'" in line, line
    result = _check_config(_config(tmp_path, url, schema, '{region: "eu"}', replays=False))
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert _refresh(_config(tmp_path, url, schema, '{region: "eu"}', replays=False)).score_stats[0].predictions == 1


#: (filter as written in YAML, the ROWS it keeps by hand, or None: refused)
UNTYPED_FILTERS = {
    "no-read-as-false": ("{market: NO}", None),
    "yes-read-as-true": ("{active: yes}", None),
    "integer": ("{shard: 3}", None),
    "number-read-as-1.1": ("{version: 1.10}", None),
    "quoted-no": ('{market: "NO"}', [1, 2, 4, 6]),
    "quoted-integer-stored-as-integer-or-text": ('{shard: "3"}', [1, 2, 5, 6]),
    "quoted-1.10-not-1.1": ('{version: "1.10"}', [1, 3, 4, 6]),
    "quoted-stored-integer-for-a-flag": ('{active: "1"}', [1, 3, 4, 6]),
}


@pytest.mark.parametrize("case", list(UNTYPED_FILTERS))
def test_a_sqlite_column_without_a_declared_type_takes_quoted_text_compared_as_text(case, tmp_path):
    """A SQLite column declared without a type keeps each value as written: here shard 3
    is the integer 3 in some rows and the text '3' (what the sqlite3 shell's .import writes)
    in others, version the text '1.10'. A number or boolean as YAML read it would silently
    miss rows (``NO`` is false, bound as 0; 1.10 is 1.1; 3 misses the text '3'), so
    check-config refuses it naming the key; quoted text selects every row written alike."""
    filter_yaml, kept = UNTYPED_FILTERS[case]
    url = f"sqlite:///{tmp_path}/store.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p REAL, market, version, shard, active)")
        )
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y INTEGER)"))
        for i, minute, score, label, market, version, shard, active, _ in ROWS:
            conn.execute(
                sa.text("INSERT INTO predictions VALUES (:i, :ts, :p, :m, :v, :s, :a)"),
                {
                    "i": i,
                    "ts": datetime(2024, 6, 1, 11, minute),
                    "p": score,
                    "m": market,
                    "v": version,
                    "s": shard if i % 2 else str(shard),  # the integer 3 and the text '3'
                    "a": int(active),
                },
            )
            conn.execute(sa.text("INSERT INTO labels VALUES (:i, :y)"), {"i": i, "y": label})
        stored = conn.execute(sa.text("SELECT DISTINCT typeof(shard) FROM predictions")).scalars().all()
    engine.dispose()
    assert sorted(stored) == ["integer", "text"]
    path = _config(tmp_path, url, None, filter_yaml, replays=False)
    result = _check_config(path)
    snap = _refresh(path)
    if kept is None:
        assert result.exit_code == 2, result.output
        key = filter_yaml.strip("{}").split(":")[0]
        line = next(line for line in result.output.splitlines() if f"models[0].predictions.filter.{key}:" in line)
        assert "YAML read the" in line and "no declared type" in line and "in quotes" in line, line
        assert _errors(snap) == {("predictions", "schema"): 1, ("labels", "schema"): 1}
    else:
        assert result.exit_code == 0, result.output
        assert not _errors(snap), _errors(snap)
        scores = np.array([r[2] for r in ROWS if r[0] in kept])
        assert snap.score_stats[0].predictions == snap.online[0].labeled == len(kept)
        assert snap.score_stats[0].mean == pytest.approx(scores.mean(), rel=1e-12)


@pytest.mark.postgres
def test_an_operator_missing_for_the_column_types_counts_as_a_schema_error(postgres_engine):
    # For column types the checks above cannot classify, PostgreSQL's own refusal
    # (42883, as for bigint = text) is still a schema fault, not a query fault.
    with postgres_engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
        conn.execute(sa.text("SELECT CAST(1 AS bigint) = CAST('1' AS text)"))
    assert info.value.orig.sqlstate == "42883"
    assert classify_error(info.value) == "schema"


# -- timestamp columns ---------------------------------------------------------------------

#: Per dialect: (declared SQL type of a timestamp column, the TimeColumn kind it is read as), by hand
TIMESTAMP_KINDS = {
    "sqlite": [
        ("TEXT", "sqlite"),
        ("DATETIME", "sqlite"),
        ("DATE", "sqlite"),
        ("VARCHAR(32)", "sqlite"),
        ("INTEGER", "epoch"),
        ("REAL", "epoch"),
        ("NUMERIC", "epoch"),
    ],
    "postgresql": [
        ("TIMESTAMP WITH TIME ZONE", "aware"),
        ("TIMESTAMP", "naive"),
        ("BIGINT", "epoch"),
        ("INTEGER", "epoch"),
        ("DOUBLE PRECISION", "epoch"),
        ("NUMERIC(20, 6)", "epoch"),
    ],
    "duckdb": [
        ("TIMESTAMPTZ", "aware"),
        ("TIMESTAMP", "naive"),
        ("BIGINT", "epoch"),
        ("DOUBLE", "epoch"),
        ("DECIMAL(18, 3)", "epoch"),
    ],
}


def test_time_column_classifies_every_accepted_timestamp_type(store, tmp_path):
    url, schema, dialect = store
    kinds = TIMESTAMP_KINDS[dialect]
    table_name = f'"{schema}".t' if schema else "t"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            columns = ", ".join(f"c{i} {sql_type}" for i, (sql_type, _) in enumerate(kinds))
            conn.execute(sa.text(f"CREATE TABLE {table_name} ({columns})"))
        source = load_settings(_config(tmp_path, url, schema)).models[0].predictions.model_copy(update={"table": "t"})
        types, _ = timestamp_types(dialect, "models[0].predictions")
        table = reflect_table(
            engine,
            source,
            {f"c{i}": f"c{i}" for i in range(len(kinds))},
            "models[0].predictions",
            {f"c{i}": (types, "") for i in range(len(kinds))},
        )
    finally:
        engine.dispose()
    found = [time_column(table, f"c{i}", source, dialect).kind for i in range(len(kinds))]
    assert found == [kind for _, kind in kinds]


@pytest.mark.parametrize("source", ["predictions", "labels"])
def test_a_text_timestamp_is_one_schema_problem_naming_its_key_where_text_is_no_instant(source, store, tmp_path):
    url, schema, dialect = store
    if dialect == "sqlite":
        pytest.skip("SQLite reads ISO-8601 text as instants (test_text_timestamps.py)")
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    q = f'"{schema}".{source}' if schema else source
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {q} ADD COLUMN stamp TEXT"))
    engine.dispose()
    path = _config(tmp_path, url, schema, replays=False)
    config = yaml.safe_load(path.read_text())
    config["models"][0][source]["columns"]["timestamp"] = "stamp"
    path.write_text(yaml.safe_dump(config))

    result = _check_config(path)
    assert result.exit_code == 2, result.output
    reflected = {"postgresql": "TEXT", "duckdb": "VARCHAR"}[dialect]  # DuckDB's TEXT is an alias of VARCHAR
    assert result.output.splitlines()[1:] == [
        f"  models[0].{source}.columns.timestamp: column 'stamp' of table '{source}' has type {reflected}; "
        f"expected a timestamp or a number of seconds since the epoch ({dialect} cannot compare text as "
        f"instants: change the column's type, or point models[0].{source}.table at a view that casts it)"
    ]


# -- filter values their column cannot hold ---------------------------------------------------

INT64 = "from -9223372036854775808 to 9223372036854775807"  # 2**63, by hand
#: (dialect, filter as written in YAML, its key, words of the error); ``small`` is a SMALLINT column
OUT_OF_RANGE = [
    ("sqlite", "{shard: 18446744073709551616}", "shard", ["18446744073709551616", "INTEGER on sqlite", INT64]),
    ("sqlite", "{shard: 9223372036854775808}", "shard", [INT64]),
    ("sqlite", "{shard: -9223372036854775809}", "shard", [INT64]),
    ("sqlite", "{small: 9223372036854775808}", "small", ["SMALLINT on sqlite", INT64]),  # 64-bit whatever declared
    ("sqlite", "{weight: 9223372036854775808}", "weight", ["REAL on sqlite", "64-bit", INT64, "1.0e+20"]),
    ("sqlite", "{shard: 1" + "0" * 400 + "}", "shard", ["(401 digits)", INT64]),
    ("postgresql", "{shard: 2147483648}", "shard", ["INTEGER on postgresql", "from -2147483648 to 2147483647"]),
    ("postgresql", "{shard: -2147483649}", "shard", ["from -2147483648 to 2147483647"]),
    ("postgresql", "{small: 32768}", "small", ["SMALLINT on postgresql", "from -32768 to 32767"]),
    ("postgresql", "{id: 9223372036854775808}", "id", ["BIGINT on postgresql", INT64]),
    ("postgresql", "{weight: 18446744073709551616}", "weight", ["REAL on postgresql", "64-bit", INT64]),
    ("postgresql", '{market: "a\\0b"}', "market", ["'a\\x00b'", "VARCHAR(8) on postgresql", "NUL character"]),
    ("postgresql", "{model_version: !!binary YQBi}", "model_version", ["'a\\x00b'", "NUL"]),  # base64 of a\0b
    ("duckdb", "{shard: 2147483648}", "shard", ["INTEGER on duckdb", "from -2147483648 to 2147483647"]),
    ("duckdb", "{small: -32769}", "small", ["SMALLINT on duckdb", "from -32768 to 32767"]),
]


def _with_smallint(url: str, schema: str | None) -> None:
    """``_tables`` plus a SMALLINT column ``small`` (NULL in every row) in the predictions."""
    _tables(url, schema, dict.fromkeys(("predictions", "labels", "replays"), "BIGINT"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {f'{schema}.' if schema else ''}predictions ADD COLUMN small SMALLINT"))
    engine.dispose()


@pytest.mark.parametrize(
    ("store", "filter_yaml", "key", "words"),
    [pytest.param(d, f, k, w, id=f"{d}-{f}"[:60]) for d, f, k, w in OUT_OF_RANGE],
    indirect=["store"],
)
def test_a_filter_value_its_column_cannot_hold_is_a_schema_error_naming_the_key_and_the_range(
    store, filter_yaml, key, words, tmp_path
):
    url, schema, _ = store
    _with_smallint(url, schema)
    path = _config(tmp_path, url, schema, filter_yaml, replays=False)

    result = _check_config(path)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if f"models[0].predictions.filter.{key}:" in line]
    for word in words:
        assert word in line, line
    assert "Traceback" not in result.output

    snap = _refresh(path)  # the schema, not an overflow (internal) or a query error each refresh
    assert _errors(snap) == {("predictions", "schema"): 1, ("labels", "schema"): 1}


#: (dialect, filter, the ROWS ids kept, by hand): the edges of each range, and NUL where text holds it
IN_RANGE = [
    ("sqlite", "{shard: 9223372036854775807}", []),
    ("sqlite", "{shard: -9223372036854775808}", []),
    ("sqlite", "{small: 9223372036854775807}", []),
    ("sqlite", '{market: "N\\0O"}', []),
    ("postgresql", "{shard: 2147483647}", []),
    ("postgresql", "{small: -32768}", []),
    ("postgresql", "{id: 9223372036854775807}", []),
    ("postgresql", "{weight: -9223372036854775808}", []),
    ("postgresql", "{shard: 2}", [3, 4]),
    ("duckdb", "{shard: -2147483648}", []),
    ("duckdb", "{small: 32767}", []),
    ("duckdb", '{market: "N\\0O"}', []),
]


@pytest.mark.parametrize(
    ("store", "filter_yaml", "kept"),
    [pytest.param(d, f, k, id=f"{d}-{f}"[:60]) for d, f, k in IN_RANGE],
    indirect=["store"],
)
def test_filter_values_at_the_edges_of_their_column_range_are_accepted(store, filter_yaml, kept, tmp_path):
    url, schema, _ = store
    _with_smallint(url, schema)
    path = _config(tmp_path, url, schema, filter_yaml, replays=False)
    result = _check_config(path)
    assert result.exit_code == 0, result.output
    snap = _refresh(path)
    assert not _errors(snap), _errors(snap)
    assert snap.score_stats[0].predictions == len(kept)


# -- reflections shared between models ---------------------------------------------------------


def test_models_reading_one_table_share_its_reflection_and_compiled_statements(store, tmp_path):
    """Two models over one predictions table (a filter each) get one ``sa.Table`` per kind of
    source, so SQLAlchemy compiles their statements once (its cache keys on the Table
    object: ``stores._shared``) and each model's numbers are those it has alone; a model
    whose labels are columns of its predictions table still reads it as two tables; a
    table altered since is reflected anew."""
    url, schema, _ = store
    _tables(url, schema, {"predictions": "BIGINT", "labels": "BIGINT", "replays": "BIGINT"})
    settings = load_settings(_config(tmp_path, url, schema, filter_yaml='{market: "NO"}'))
    no = settings.models[0]
    se = no.model_copy(
        update={"name": "se", "predictions": no.predictions.model_copy(update={"filter": {"market": "SE"}})}
    )
    columns = no.labels.columns.model_copy(update={"label": "active"})
    labels = no.labels.model_copy(update={"table": "predictions", "columns": columns})
    inline = no.model_copy(update={"name": "inline", "labels": labels})

    def alone(model):
        stores = Stores(settings.stores, settings.query_timeout)
        try:
            return ModelRefresher(model, "models[0]", settings.refresh_policy, stores).refresh(AS_OF)
        finally:
            stores.dispose()

    stores = Stores(settings.stores, settings.query_timeout)
    engine = stores.engine("s")
    refreshers = [ModelRefresher(m, f"models[{i}]", settings.refresh_policy, stores) for i, m in enumerate((no, se))]
    first = refreshers[0].refresh(AS_OF)
    compiled = len(engine._compiled_cache)
    second = refreshers[1].refresh(AS_OF)
    assert len(engine._compiled_cache) == compiled  # the second model compiled nothing of its own
    for name in ("predictions", "labels", "replays"):
        a, b = (r.sources[name].queries().table for r in refreshers)
        assert a is b, name
    assert [s.predictions for s in first.score_stats + second.score_stats] == [4, 1]  # NO, SE in ROWS
    for model, snapshot in ((no, first), (se, second)):
        assert all(status.up for status in snapshot.sources.values()), snapshot.errors
        assert snapshot.score_stats == alone(model).score_stats
        assert snapshot.online == alone(model).online
        assert snapshot.replays == alone(model).replays

    own = ModelRefresher(inline, "models[2]", settings.refresh_policy, stores)
    own.check_schema()
    assert own.sources["predictions"].queries().table is refreshers[0].sources["predictions"].queries().table
    assert own.sources["labels"].queries().table is not own.sources["predictions"].queries().table
    labeled = own.refresh(AS_OF).online[0]
    rows = [r for r in ROWS if r[4] == "NO"]  # every NO row is labeled by its own `active`
    expected = log_loss([r[7] for r in rows], [r[2] for r in rows], labels=[0, 1])
    assert labeled.logloss == pytest.approx(expected, rel=1e-12)

    q = f'"{schema}".predictions' if schema else "predictions"
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {q} ADD COLUMN extra INTEGER"))
    altered = ModelRefresher(no, "models[3]", settings.refresh_policy, stores)
    altered.check_schema()
    assert altered.sources["predictions"].queries().table is not refreshers[0].sources["predictions"].queries().table
    assert "extra" in altered.sources["predictions"].queries().table.c
    stores.dispose()


def test_a_postgresql_enum_given_a_label_since_is_reflected_anew(postgres_schema, tmp_path):
    """Review 2026-12-03: an enum column's DDL is its type's name, so a table whose enum was
    given a label since would have been handed its old reflection (``stores._shared``), whose
    type refuses the new label when a value is read through it."""
    url, schema = postgres_schema
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TYPE \"{schema}\".region AS ENUM ('eu', 'us')"))
        conn.execute(sa.text(f'CREATE TABLE "{schema}".t (id BIGINT, region "{schema}".region)'))
    source = load_settings(_config(tmp_path, url, schema)).models[0].predictions.model_copy(update={"table": "t"})

    def reflected():
        return reflect_table(engine, source, {"id": "id"}, "models[0].predictions")

    before = reflected()
    assert reflected() is before  # the same DDL and types: one object
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TYPE \"{schema}\".region ADD VALUE 'apac'"))
    after = reflected()
    assert after is not before
    assert after.c.region.type.enums == ["eu", "us", "apac"]
    engine.dispose()
