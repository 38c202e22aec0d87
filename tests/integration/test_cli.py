"""The command line as a new user meets it: --version, the help, the log of a command."""

import re
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from exporter.cli import app

COMMANDS = ["check-config", "serve", "once", "backfill", "load", "demo", "report-training"]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"mlmon {version('mlmon')}\n"


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_has_no_type_placeholders(command):
    result = CliRunner().invoke(app, [*command, "--help"], prog_name="mlmon", terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    # typer's placeholders (<str>, <list[Path]>, {files}...) and rich's box drawing
    assert not re.search(r"<\w+(\[\w+\])?>|\{\w+\}|[╭│]", text), text
    if command:
        assert text.startswith(f"Usage: mlmon {command[0]} [OPTIONS]")


def test_every_command_is_registered_and_its_help_is_plain_text():
    """Help is read in a terminal: no reStructuredText markup (``literal``, :role:`x`) from docstrings."""
    import typer.main

    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)  # a new command gets the help checks above too
    for command in [[], *([c] for c in COMMANDS)]:
        text = CliRunner().invoke(app, [*command, "--help"], prog_name="mlmon", terminal_width=100).output
        assert not re.search(r"``|:\w+:`|`_", text), text


def test_load_help_names_its_arguments_like_a_unix_tool():
    text = CliRunner().invoke(app, ["load", "--help"], prog_name="mlmon", terminal_width=100).output
    assert "Usage: mlmon load [OPTIONS] FILE...\n" in text
    assert re.search(r"^  FILE\.\.\. +CSV or Parquet files\.$", text, re.MULTILINE), text
    assert re.search(r"^  --url URL +SQLAlchemy URL", text, re.MULTILINE), text


def test_command_list_shows_whole_short_help():
    text = CliRunner().invoke(app, ["--help"], terminal_width=100).output
    commands = text[text.index("Commands:") :]
    assert "..." not in commands, commands
    assert all(name in commands for name in COMMANDS)


def test_alembic_steps_are_not_logged_at_info(tmp_path):
    """The state database is migrated on every ``once``; Alembic's INFO lines are not
    the operator's news (DEBUG shows them)."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER, ts TIMESTAMP, s FLOAT)"))
    engine.dispose()
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f'stores: {{s: {{url: "sqlite:///{tmp_path}/db.sqlite"}}}}\n'
        "models: [{name: m, predictions: {store: s, table: p, columns: {id: id, timestamp: ts, score: s}}}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mlmon-state.sqlite").exists()  # migrated, silently
    assert "alembic" not in done.stderr, done.stderr
    assert "mlmon_prediction" in done.stdout


def test_demo_on_a_port_in_use_fails_before_seeding(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "exporter", "demo", "--port", str(port), "--database", str(tmp_path / "d.sqlite")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert done.stdout == ""  # no "open http://..." for a server that never starts
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert not (tmp_path / "d.sqlite").exists()
    assert time.monotonic() - started < 8  # seeding alone takes about 10 s


#: ``--as-of`` -> accepted, for a model with windows up to 7d, label_delay 1d and ingestion_delay
#: 2d, by hand: from 0001-01-02 + 8 days to 9999-12-31 - 1 minute (UTC), both included
AS_OF_EDGES = {
    "9999-12-31T23:59:30Z": False,
    "9999-12-31T00:00:00Z": False,
    "9999-12-30T23:59:00.000001Z": False,
    "9999-12-30T23:59:00Z": True,
    "9999-12-30T23:59:00-14:00": False,  # 9999-12-31T13:59Z
    "0001-01-01T00:00:00Z": False,
    "0001-01-01T00:00:00+01:00": False,  # before the first datetime in UTC
    "0001-01-09T23:59:59.999999Z": False,
    "0001-01-10T00:00:00Z": True,
    "0001-01-10T05:00:00+05:00": True,
    "0001-01-10": True,  # naive: UTC
}


@pytest.mark.parametrize(("zone", "ingestion"), [("UTC", "2d"), ("Pacific/Kiritimati", "2d"), ("America/Adak", "0s")])
def test_once_refuses_an_as_of_whose_windows_leave_the_computable_range(tmp_path, zone, ingestion):
    """A refresh time whose windows start before 0001-01-02 or whose future bound passes
    9999-12-31 failed every source with an overflow; now it is a usage error naming --as-of
    and the range, and the edges themselves refresh every source (SQLite text timestamps in
    ``zone``: window edges converted to wall clock at both ends of the calendar; without an
    ingestion delay, the counter's horizon looks for clock set-backs up to the edges:
    ``stores.written_by``)."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE p (id INTEGER, ts TEXT, s FLOAT)"))
        conn.execute(sa.text("CREATE TABLE l (id INTEGER, ts TEXT, y INTEGER)"))
        conn.execute(sa.text("INSERT INTO p VALUES (1, '0001-01-09 12:00:00', 0.5), (2, '9999-12-30 12:00', 0.5)"))
        conn.execute(sa.text("INSERT INTO l VALUES (1, '0001-01-09 13:00:00', 1), (2, '9999-12-30 13:00', 0)"))
    engine.dispose()
    config = tmp_path / "mlmon.yml"
    config.write_text(
        f'stores: {{s: {{url: "{url}"}}}}\n'
        "models:\n"
        "  - name: m\n"
        f"    predictions: {{store: s, table: p, columns: {{id: id, timestamp: ts, score: s}}, timezone: {zone},\n"
        f"                  ingestion_delay: {ingestion}}}\n"
        f"    labels: {{store: s, table: l, columns: {{id: id, timestamp: ts, label: y}}, timezone: {zone}}}\n"
        "    windows: [1h, 7d]\n"
        "    label_delay: 1d\n"
    )
    for as_of, accepted in AS_OF_EDGES.items():
        result = CliRunner().invoke(app, ["once", "--config", str(config), "--as-of", as_of])
        if accepted:
            assert result.exit_code == 0, (as_of, result.output)
            assert 'mlmon_source_up{model="m",source="labels"} 1.0' in result.stdout.splitlines()
        else:
            assert result.exit_code == 2, (as_of, result.output)
            assert result.output.splitlines() == [
                f"--as-of: {as_of!r} is outside the times this config can be computed at, 0001-01-10T00:00:00+00:00 "
                "to 9999-12-30T23:59:00+00:00 (UTC): every window, label_delay and ingestion_delay before it and "
                "the minute after it must lie within 0001-01-02 and 9999-12-31"
            ]
