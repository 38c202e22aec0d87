"""Alembic migrations of mlmon's state database (see ``exporter.state.migrate``)."""
