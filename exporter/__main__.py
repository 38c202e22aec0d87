"""`python -m exporter` runs the mlmon command line."""

from exporter.cli import app

app()
