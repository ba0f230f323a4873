# The daemon image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY broker ./broker
COPY api ./api
COPY db ./db
COPY simulator ./simulator
RUN pip install --no-cache-dir . && useradd --system energy
USER energy
EXPOSE 8000
CMD ["energy-ingest", "run"]
