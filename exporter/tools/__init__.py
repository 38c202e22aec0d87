"""Command-line tools beside the service: the demo and the CSV/Parquet loader."""
