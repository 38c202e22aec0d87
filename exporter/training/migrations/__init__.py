"""Alembic migrations of mlmon's state database (see ``exporter.training.storage.migrate``)."""
