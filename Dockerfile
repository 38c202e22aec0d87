# mlmon, the exporter: `docker build -t mlmon .`, then
#   docker run --read-only -v mlmon-state:/var/lib/mlmon -v $PWD/mlmon.yml:/etc/mlmon/mlmon.yml:ro -p 127.0.0.1:9847:9847 mlmon
# The tag pins the Python patch release and the Debian release, so a rebuild gets the same base.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from (.dockerignore keeps the rest of the repo out).
COPY pyproject.toml README.md /tmp/mlmon-src/
COPY exporter /tmp/mlmon-src/exporter
# The postgresql extra brings psycopg's binary wheel: no compiler, no libpq to install.
RUN pip install --no-cache-dir "/tmp/mlmon-src[postgresql]" && rm -rf /tmp/mlmon-src

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 mlmon \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mlmon --shell /usr/sbin/nologin mlmon \
 && mkdir -p /var/lib/mlmon /etc/mlmon && chown 10001:10001 /var/lib/mlmon
# The only writable place: the default SQLite state database (sqlite:///mlmon-state.sqlite,
# relative to the working directory) lands on this volume, and the root filesystem can be
# read-only.
WORKDIR /var/lib/mlmon
VOLUME ["/var/lib/mlmon"]
USER 10001:10001

EXPOSE 9847
# slim has no curl: ask /healthz with Python's standard library (a non-2xx raises, exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9847/healthz', timeout=4)"]
ENTRYPOINT ["mlmon"]
CMD ["serve", "--config", "/etc/mlmon/mlmon.yml", "--host", "0.0.0.0"]
