"""Config validation: every error names its key path; check-config exits 2."""

import textwrap

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from exporter.cli import app
from exporter.config import ConfigError, parse_settings
from exporter.durations import parse_duration


def _config(**model_overrides):
    model = {
        "name": "ctr",
        "predictions": {"store": "s", "table": "predictions", "columns": {"id": "id", "timestamp": "ts", "score": "p"}},
    }
    model.update(model_overrides)
    return {"stores": {"s": {"url": "sqlite://"}}, "models": [model]}


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    return info.value.errors


def test_defaults():
    settings = parse_settings(_config())
    model = settings.models[0]
    assert model.windows == ["1h", "24h"]
    assert settings.staleness_period == 3 * settings.refresh_interval
    assert model.labels is None and model.mode_share_decimals == 6


@pytest.mark.parametrize(
    ("windows", "width"),
    [(["1h", "24h"], "5m"), (["5m", "30d"], "2h30m"), (["1m"], "5s"), (["90s", "2h"], "25s")],
)
def test_time_slice_by_default(windows, width):
    """The smallest window / 12 or the largest / 288, whichever is longer, in whole seconds."""
    assert parse_settings(_config(windows=windows)).models[0].slice_width() == parse_duration(width)


def test_time_slice_at_most_1440_per_window():
    assert parse_settings(_config(time_slice="1m")).models[0].slice_width() == parse_duration("1m")
    assert _errors(_config(time_slice="59s")) == [
        "models[0].time_slice: 59s cuts the largest window into 1465 slices; at most 1440 (each is kept in memory "
        "and named by a cold refresh's statement): make it at least 60s"
    ]


def test_unknown_key_named_with_its_path():
    data = _config()
    data["models"][0]["predictions"]["columns"]["scor"] = "p"
    assert _errors(data) == [
        "models[0].predictions.columns.scor: unknown key 'scor' (did you mean 'score'? allowed: id, score, timestamp, version)"
    ]


@pytest.mark.parametrize(
    "where, key, suggestion, allowed",
    [
        (("models", 0), "lable_delay", "label_delay", "label_delay"),
        (("stores", "s"), "urll", "url", "password, password_file, url, url_file"),
        (("models", 0, "predictions"), "tabel", "table", "schema"),  # an alias is a key too
        ((), "refresh_intervall", "refresh_interval", "alerting, api,"),
        (("models", 0, "predictions"), "zzz", None, "unique_ids"),  # nothing close: no guess
    ],
)
def test_unknown_key_lists_the_allowed_keys_and_the_closest(where, key, suggestion, allowed):
    data = _config()
    node = data
    for part in where:
        node = node[part]
    node[key] = 1
    [error] = _errors(data)
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*where, key)).lstrip(".")
    assert error.startswith(f"{path}: unknown key {key!r} (")
    assert (f"did you mean {suggestion!r}?" in error) == (suggestion is not None)
    assert allowed in error


def test_missing_key_named_with_its_path():
    data = _config()
    del data["models"][0]["predictions"]["columns"]["score"]
    assert _errors(data) == ["models[0].predictions.columns.score: Field required"]


@pytest.mark.parametrize("field, value", [("windows", ["1h", "ten minutes"]), ("label_delay", "1y")])
def test_bad_duration(field, value):
    errors = _errors(_config(**{field: value}))
    assert len(errors) == 1 and errors[0].startswith(f"models[0].{field}")
    assert "invalid duration" in errors[0]


@pytest.mark.parametrize("field, value", [("windows", ["6h", 90]), ("label_delay", 90)])
def test_a_bare_number_as_duration_is_told_the_form(field, value):
    """YAML reads ``90`` as a number: the error says what a duration looks like, not only
    that a string was expected."""
    [error] = _errors(_config(**{field: value}))
    assert error.startswith(f"models[0].{field}") and "like '60s' or '1h', got 90" in error, error


def test_labels_must_share_the_predictions_store():
    data = _config(labels={"store": "other", "table": "l", "columns": {"id": "id", "label": "y"}})
    data["stores"]["other"] = {"url": "sqlite://"}
    assert _errors(data) == [
        "models[0].labels.store: must be the predictions store 's', got 'other' "
        "(labels and replays are joined to predictions inside the database)"
    ]


def test_unknown_store():
    data = _config()
    data["models"][0]["predictions"]["store"] = "nope"
    data["models"][0]["labels"] = {"store": "nope2", "table": "l", "columns": {"id": "id", "label": "y"}}
    assert _errors(data) == [
        "models[0].predictions.store: unknown store 'nope' (stores: s)",
        "models[0].labels.store: unknown store 'nope2' (stores: s)",
    ]
    # A misspelt predictions store is that one error, not also a labels store "not the predictions'".
    data["models"][0]["labels"]["store"] = "s"
    assert _errors(data) == ["models[0].predictions.store: unknown store 'nope' (stores: s)"]


def test_env_reference_expanded(monkeypatch):
    monkeypatch.setenv("MLMON_TEST_URL", "sqlite:///x.db")
    data = _config()
    data["stores"]["s"]["url"] = "${MLMON_TEST_URL}"
    assert parse_settings(data).stores["s"].url == "sqlite:///x.db"


def test_unset_env_reference_named(monkeypatch):
    monkeypatch.delenv("MLMON_UNSET_VAR", raising=False)
    data = _config()
    data["stores"]["s"]["url"] = "postgresql://u:${MLMON_UNSET_VAR}@h/db"
    assert _errors(data) == ["stores.s.url: environment variable MLMON_UNSET_VAR is not set"]


def test_unset_env_references_are_reported_with_every_other_problem(monkeypatch):
    """configuration.md promises every problem in one run: a typo elsewhere is not hidden
    until the variables are set, and the empty value an unset variable leaves is not
    reported a second time at its own key."""
    monkeypatch.delenv("MLMON_UNSET_VAR", raising=False)
    monkeypatch.delenv("MLMON_UNSET_URL", raising=False)
    data = _config()
    data["stores"]["s"]["url"] = "${MLMON_UNSET_URL}"
    data["stores"]["t"] = {"url": "sqlite:///t.db", "password": "${MLMON_UNSET_VAR}"}
    data["models"][0]["lable_delay"] = "1h"
    errors = _errors(data)
    assert errors[:2] == [
        "stores.s.url: environment variable MLMON_UNSET_URL is not set",
        "stores.t.password: environment variable MLMON_UNSET_VAR is not set",
    ]
    assert len(errors) == 3 and errors[2].startswith("models[0].lable_delay: unknown key"), errors


def test_url_from_file(tmp_path):
    secret = tmp_path / "url"
    secret.write_text("sqlite:///from-file.db\n")
    data = _config()
    data["stores"]["s"] = {"url_file": str(secret)}
    assert (
        parse_settings(data).stores["s"].resolved_url().render_as_string(hide_password=False)
        == "sqlite:///from-file.db"
    )


def test_password_apart_from_the_url_needs_no_encoding(monkeypatch, tmp_path):
    monkeypatch.setenv("MLMON_TEST_PASSWORD", "hun@ter9:/x")
    data = _config()
    data["stores"]["s"] = {"url": "postgresql+psycopg://mlmon@db:5432/serving", "password": "${MLMON_TEST_PASSWORD}"}
    url = parse_settings(data).stores["s"].resolved_url()
    assert (url.username, url.password, url.host, url.database) == ("mlmon", "hun@ter9:/x", "db", "serving")
    assert "hun@ter9" not in str(url) and "hun@ter9" not in repr(parse_settings(data))
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    data["stores"]["s"] = {"url": "postgresql+psycopg://mlmon@db/serving", "password_file": str(secret)}
    assert parse_settings(data).stores["s"].resolved_url().password == "from-file"


def test_bad_url_named_without_echoing_it():
    data = _config()
    data["stores"]["s"] = {"url": "postgresql://u:s3cret@host:notaport/db"}
    (error,) = _errors(data)
    assert error.startswith("stores.s.url: ") and "not a SQLAlchemy URL" in error and "s3cret" not in error


def test_duplicate_model_names():
    data = _config()
    data["models"].append(dict(data["models"][0]))
    assert _errors(data) == ["models[1].name: duplicate model name 'ctr'"]


def _write(tmp_path, text):
    path = tmp_path / "mlmon.yml"
    path.write_text(textwrap.dedent(text))
    return path


def _table(url):
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts TIMESTAMP, p FLOAT)"))
    engine.dispose()


CONFIG = """
    stores:
      s: {{url: "{url}"}}
    models:
      - name: ctr
        predictions:
          store: s
          table: {table}
          columns: {{id: id, timestamp: ts, score: {score}}}
    """


def test_check_config_ok(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    _table(url)
    result = CliRunner().invoke(
        app, ["check-config", "--config", str(_write(tmp_path, CONFIG.format(url=url, table="predictions", score="p")))]
    )
    assert result.exit_code == 0, result.output
    assert "OK (1 model(s), 1 store(s))" in result.output


@pytest.mark.parametrize(
    "table, score, message",
    [
        ("preds", "p", "models[0].predictions.table: table 'preds' does not exist in store 's'"),
        ("predictions", "y_pred_proba", "models[0].predictions.columns.score: column 'y_pred_proba' does not exist"),
    ],
)
def test_check_config_missing_table_or_column(tmp_path, table, score, message):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    _table(url)
    result = CliRunner().invoke(
        app, ["check-config", "--config", str(_write(tmp_path, CONFIG.format(url=url, table=table, score=score)))]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_check_config_names_a_driver_that_is_not_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pg8000") is not None:  # a PostgreSQL driver mlmon does not install
        pytest.skip("pg8000 is installed here")
    config = CONFIG.format(url="postgresql+pg8000://mlmon@127.0.0.1/test", table="predictions", score="p")
    result = CliRunner().invoke(app, ["check-config", "--config", str(_write(tmp_path, config))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        "the driver of 'postgresql+pg8000' is not installed: pip install the package of module 'pg8000'"
        in result.output
    )


def test_a_missing_driver_of_an_mlmon_extra_names_the_editable_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail, as if not installed
    config = CONFIG.format(url="postgresql+psycopg://mlmon@127.0.0.1/test", table="predictions", score="p")
    result = CliRunner().invoke(app, ["check-config", "--config", str(_write(tmp_path, config))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        "the driver of 'postgresql+psycopg' is not installed: pip install -e '.[postgresql]' in mlmon's clone"
        in " ".join(result.output.split())
    ), result.output


@pytest.mark.parametrize(
    "url, postgres",
    [
        ("postgres://mlmon:secret@127.0.0.1/test", True),
        ("postgres+psycopg://mlmon@127.0.0.1/test", True),
        ("postgresql+nodriver://mlmon@127.0.0.1/test", True),
        ("oracle+nodriver://mlmon@127.0.0.1/test", False),
        ("mssqlx://mlmon@127.0.0.1/test", False),
    ],
)
def test_an_unknown_dialect_lists_the_supported_schemes(tmp_path, url, postgres):
    config = CONFIG.format(url=url, table="predictions", score="p")
    result = CliRunner().invoke(app, ["check-config", "--config", str(_write(tmp_path, config))])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in output and "Can't load plugin" not in output, output
    scheme = url.split("://")[0]
    assert f"unknown database type {scheme!r} in the URL" in output, output
    assert "mlmon supports sqlite:///path.db, postgresql+psycopg://user@host/db and duckdb:///path.duckdb" in output
    assert ("for PostgreSQL write postgresql+psycopg://user@host/db" in output) is postgres
    assert "secret" not in output


def test_check_config_invalid_yaml_key(tmp_path):
    path = _write(
        tmp_path, "    refresh_interval: soon" + CONFIG.format(url="sqlite://", table="predictions", score="p")
    )
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert "refresh_interval: invalid duration 'soon'" in result.output


def test_check_config_unreachable_store_hides_password(tmp_path):
    url = "postgresql+psycopg://mlmon:s3cret@127.0.0.1:1/test"
    config = CONFIG.format(url=url, table="p", score="p")
    config += """
      - name: ctr2
        predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: p}}
    """
    result = CliRunner().invoke(app, ["check-config", "--config", str(_write(tmp_path, config))])
    assert result.exit_code == 2
    # Named by the key that holds the URL, once for both models on it.
    lines = result.output.splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 2, result.output
    assert lines[1].startswith(
        "  stores.s.url: cannot reach store 's' at postgresql+psycopg://mlmon:***@127.0.0.1:1/test: "
    )
    assert "s3cret" not in result.output


def test_check_config_reports_every_problem_of_every_model_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE predictions (id INTEGER, ts BLOB, p FLOAT, v TEXT)"))
        conn.execute(sa.text("CREATE TABLE labels (id INTEGER, y TEXT)"))
        conn.execute(sa.text("CREATE TABLE replays (id INTEGER, s FLOAT)"))
    engine.dispose()
    config = f"""
    stores:
      s: {{url: "{url}"}}
    models:
      - name: a
        predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: score}}, filter: {{env: x}}}}
        labels: {{store: s, table: labels, columns: {{id: id, label: y, timestamp: t}}}}
        replays: {{store: s, table: replays, columns: {{id: id, score: s}}}}
      - name: b
        predictions: {{store: s, table: preds, columns: {{id: id, timestamp: ts, score: p}}}}
      - name: c
        predictions: {{store: s, table: predictions, columns: {{id: id, timestamp: ts, score: v}}}}
    """
    result = CliRunner().invoke(app, ["check-config", "--config", str(_write(tmp_path, config))])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "invalid configuration:",
        (
            "  models[0].predictions.columns.timestamp: column 'ts' of table 'predictions' has type BLOB; "
            "expected a timestamp or a number of seconds since the epoch, or ISO-8601 text"
        ),
        "  models[0].predictions.columns.score: column 'score' does not exist in table 'predictions' (columns: id, ts, p, v)",
        "  models[0].predictions.filter.env: column 'env' does not exist in table 'predictions' (columns: id, ts, p, v)",
        "  models[0].labels.columns.label: column 'y' of table 'labels' has type TEXT; expected a number or a boolean (0/1)",
        "  models[0].labels.columns.timestamp: column 't' does not exist in table 'labels' (columns: id, y)",
        "  models[1].predictions.table: table 'preds' does not exist in store 's'",
        (
            "  models[2].predictions.columns.timestamp: column 'ts' of table 'predictions' has type BLOB; "
            "expected a timestamp or a number of seconds since the epoch, or ISO-8601 text"
        ),
        "  models[2].predictions.columns.score: column 'v' of table 'predictions' has type TEXT; expected a number (probability)",
    ]


@pytest.mark.parametrize(
    "text, position, problem",
    [
        ('stores:\n  s: {url: "sqlite://"\nmodels: []\n', "3:1", "expected ',' or '}', but got '<scalar>'"),
        ("stores:\n\tx: 1\n", "2:1", "found character '\\t' that cannot start any token"),
        ("models:\n  - name: a\n   bad: [1\n", "3:4", ""),
    ],
)
def test_invalid_yaml_names_file_line_and_column_on_one_line(tmp_path, text, position, problem):
    path = tmp_path / "mlmon.yml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    [line] = result.output.splitlines()[1:]
    assert line.startswith(f"  {path}:{position}: invalid YAML: {problem}"), line


def test_alert_thresholds_defaults_overrides_and_switch_off():
    data = _config(alert_thresholds={"mode_share_ratio_max": 0.9, "calibration_ratio_min": None})
    data["alerting"] = {"online_roc_auc_min": 0.6}
    settings = parse_settings(data)
    ctr = settings.thresholds("ctr")
    assert ctr["mode_share_ratio_max"] == 0.9  # the model's override
    assert ctr["online_roc_auc_min"] == 0.6  # the global setting
    assert ctr["reproducibility_ratio_min"] == 0.99  # the default
    assert "calibration_ratio_min" not in ctr and "online_logloss_max" not in ctr  # switched off
    assert settings.thresholds("known_from_training_runs_only")["mode_share_ratio_max"] == 0.5


def test_unknown_alert_threshold_named():
    (error,) = _errors(_config(alert_thresholds={"mode_share_max": 0.9}))
    assert error.startswith("models[0].alert_thresholds: unknown threshold(s) ['mode_share_max']")


@pytest.mark.parametrize("content", ["", "\n", "short-token\n"])
def test_token_file_must_hold_a_real_token(tmp_path, content):
    secret = tmp_path / "token"
    secret.write_text(content)
    data = _config()
    data["api"] = {"token_file": str(secret)}
    (error,) = _errors(data)
    assert error == "api.token_file: the token must have at least 16 characters"


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"table": "f", "numeric": ["a"]}, "give 'table' and 'id' together"),
        ({"id": "rid", "numeric": ["a"]}, "give 'table' and 'id' together"),
        ({"numeric": ["a"], "categorical": ["a"]}, "column(s) ['a'] declared both numeric and categorical"),
        ({"numeric": ["a", "a"]}, "numeric: duplicate column in ['a', 'a']"),
        ({"numeric": ["a"], "exclude": ["b"]}, "exclude: only with 'numeric: all' or 'categorical: all'"),
        ({}, "declare at least one feature in 'numeric' or 'categorical'"),
        ({"schema": "x", "numeric": ["a"]}, "schema: only with 'table'"),
    ],
)
def test_bad_features_named(features, message):
    errors = _errors(_config(features=features))
    assert len(errors) == 1 and errors[0].startswith("models[0].features") and message in errors[0], errors


def test_the_predictions_own_columns_are_no_features():
    data = _config(features={"numeric": ["p", "age"], "categorical": "all"})
    assert _errors(data) == ["models[0].features.numeric: ['p'] are the predictions' own columns, not features"]
