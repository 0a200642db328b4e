# One coordinator node (docker-compose.yml runs three of them behind nginx).
#
# Settings come from COORDINATOR_* environment variables: every `coordinator serve` flag
# has one (--redis-url -> COORDINATOR_REDIS_URL, --node-id -> COORDINATOR_NODE_ID,
# --secret -> COORDINATOR_SECRET, ...). Set COORDINATOR_REDIS_URL: the image has no
# redis-server for the embedded fallback. Secrets come from the environment or a mounted
# file (--secret-file / COORDINATOR_SECRET_FILE), never from the command line.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs: tests, bench and deploy stay out of the image.
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY workers ./workers
# The event store's default directory, owned by the node's user (a volume mounted there
# starts with this owner): nodes sharing that volume share one store.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home coordinator \
    && mkdir -p /var/lib/coordinator/events \
    && chown -R coordinator /var/lib/coordinator

USER coordinator
EXPOSE 8000

HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# SIGTERM (docker stop) drains the node; give it the drain timeout (stop_grace_period).
CMD ["coordinator", "serve", "--host", "0.0.0.0", "--port", "8000"]
