"""The SQL of the state database's baseline query in each dialect (issue B7)."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import mysql, postgresql, sqlite

from exporter.training.storage import _before, training_runs


@pytest.mark.parametrize(
    "dialect, sql",
    [
        (postgresql.dialect(), "(mlmon_training_runs.trained_at - INTERVAL '720 hours')"),
        # MySQL refuses the quoted interval literal: its unit is a keyword
        (mysql.dialect(), "(mlmon_training_runs.trained_at - INTERVAL 720 HOUR)"),
        (
            sqlite.dialect(),
            "(strftime('%Y-%m-%d %H:%M:%S', mlmon_training_runs.trained_at, '-720 hours')"
            " || substr(mlmon_training_runs.trained_at, 20))",
        ),
    ],
    ids=["postgresql", "mysql", "sqlite"],
)
def test_thirty_days_before_compiles_to_each_dialects_interval_syntax(dialect, sql):
    assert str(_before(training_runs.c.trained_at).compile(dialect=dialect)) == sql
