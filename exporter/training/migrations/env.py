"""Alembic environment: always run by ``exporter.training.storage.migrate`` with an open connection."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    # A name of our own: the state may share a database with the user's own tables.
    version_table="mlmon_alembic_version",
    render_as_batch=True,  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
