"""mlmon's tests, laid out like the package: ``unit/`` needs nothing but Python; ``integration/``
needs PostgreSQL, promtool, Prometheus, Alertmanager or child processes. Shared fixtures and
helpers are in ``tests/conftest.py`` (import them as ``from tests.conftest import ...``)."""
