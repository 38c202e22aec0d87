"""The training side: the run schema, run storage and its migrations, the training metrics, the API.

Kept empty on purpose: ``exporter.client`` imports :mod:`exporter.training.schema.schema`, which must not
pull in SQLAlchemy or FastAPI through this package.
"""
