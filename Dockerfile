# The daemon image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md requirements.lock mosquitto.conf ./
COPY daemon ./daemon
COPY broker ./broker
COPY api ./api
COPY db ./db
COPY simulator ./simulator
# Dependencies at the versions and hashes of the lock file; then the project, alone.
RUN pip install --no-cache-dir --require-hashes -r requirements.lock \
    && pip install --no-cache-dir --no-deps . \
    && useradd --system energy
USER energy
EXPOSE 8000
CMD ["energy-ingest", "run"]
