-- The stack's prediction store. The model server writes predictions, the traffic
-- generator writes labels and replays, mlmon reads all three (stack/mlmon.yml) and keeps
-- its own training-run tables in the same database. PostgreSQL runs this once, when the
-- postgres-data volume is new (`docker compose down -v` to start over).

CREATE TABLE predictions (
    id            text PRIMARY KEY,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    "timestamp"   timestamptz NOT NULL,
    score         double precision NOT NULL
);
-- Every mlmon window query filters on the model and a time range.
CREATE INDEX predictions_model_name_timestamp_idx ON predictions (model_name, "timestamp");

-- Clicks only: a prediction without a row was not clicked (mlmon's `missing: negative`).
-- The primary keys of labels and replays are the indexes of mlmon's joins by id.
CREATE TABLE labels (
    id          text PRIMARY KEY,
    clicked     smallint NOT NULL CHECK (clicked IN (0, 1)),
    "timestamp" timestamptz NOT NULL DEFAULT now()  -- when the label arrived
);

-- Offline re-computations of served scores, for a sample of the predictions.
CREATE TABLE replays (
    id    text PRIMARY KEY,
    score double precision NOT NULL
);
