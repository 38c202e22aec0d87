"""mlmon: a Prometheus exporter for machine-learning model monitoring."""

__version__ = "0.1.0"
