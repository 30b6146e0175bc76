# One image for every deltaflush process: worker, beat, flower, exporter, CLI.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
RUN pip install --no-cache-dir '.[flower]' \
    && useradd --create-home --uid 10001 deltaflush \
    && mkdir /lake && chown deltaflush /lake
USER deltaflush
# Celery's warm shutdown on SIGTERM: running flushes finish their current file first.
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "workers.app", "worker", "--loglevel=INFO"]
