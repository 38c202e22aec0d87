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

COMMANDS = ["check-config", "serve", "once", "load", "demo", "report-training"]


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
