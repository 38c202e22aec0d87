#!/bin/sh
# mlmon's read-only role for the prediction store (stack/mlmon.yml's `stores`): SELECT on
# the three tables mlmon reads, nothing else. Run by PostgreSQL's entrypoint after
# init.sql (scripts run in name order), with the password from the environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v reader_password="$MLMON_READER_PASSWORD" -v database="$POSTGRES_DB" <<'SQL'
CREATE ROLE mlmon_reader LOGIN PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE :"database" TO mlmon_reader;
GRANT USAGE ON SCHEMA public TO mlmon_reader;
GRANT SELECT ON predictions, labels, replays TO mlmon_reader;
SQL
