"""Configuration: one typed object read from the environment (and `.env`) once at start-up.

Every setting is documented in the README with its default; the defaults live here and
nowhere else.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_client_id() -> str:
    # A fixed id per host keeps the broker-side session (and its queued messages) across
    # restarts; replicas on other hosts get their own id and share through $share groups.
    return f"energy-ingest-{socket.gethostname()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (several hosts with target_session_attrs=read-write for "
        "a primary that fails over); unset starts a private PostgreSQL under VAR_DIR",
    )
    # A streaming replica for operators' reads; unset, they go to the primary (on a pool of
    # their own either way).
    database_read_url: str | None = None
    db_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Connections for operators' reads (analytics, dashboard, status): never the writer's.
    db_read_pool_size: int = Field(default=4, ge=1, le=64)
    # "transaction" behind a pooler in transaction mode (PgBouncer pool_mode=transaction,
    # managed poolers): no named prepared statements, the schema from the role's search_path.
    db_pooler: Literal["none", "transaction"] = "none"

    mqtt_url: str | None = Field(
        default=None,
        description="mqtt[s]://[user:password@]host[:port]; unset starts a private Mosquitto",
    )
    mqtt_ca_file: Path | None = Field(default=None, description="mqtts: trust anchors (PEM)")
    mqtt_client_cert_file: Path | None = None
    mqtt_client_key_file: Path | None = None
    mqtt_client_id: str = Field(default_factory=_default_client_id, min_length=1)
    mqtt_shared_group: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    mqtt_qos: int = Field(default=1, ge=0, le=1)
    mqtt_session_expiry_s: int = Field(default=7 * 86400, ge=0)
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_receive_maximum: int = Field(default=20000, ge=1, le=65535)
    # Above the broker's max_packet_size (mosquitto.conf: 4 MiB + 16 KiB) by more than a
    # topic alias can add (64 KiB): what the broker accepts, the daemon can receive.
    mqtt_max_packet_bytes: int = Field(default=4 * 1024 * 1024 + 131_072, ge=1024, le=268_435_460)

    flush_max_readings: int = Field(default=2000, ge=1)
    # Short: under load batches grow by themselves while earlier flushes are in flight; the
    # interval only bounds how long a lone reading waits (HTTP answers after the commit).
    flush_interval_ms: int = Field(default=5, ge=1)
    buffer_max_readings: int = Field(default=50000, ge=1)
    flush_concurrency: int = Field(default=2, ge=1, le=16)

    retention_days: int = Field(default=30, ge=1)
    partition_lookahead_days: int = Field(default=3, ge=1)
    upkeep_interval_s: int = Field(default=3600, ge=1)
    # How often the deltas the flushes append are folded into the hourly roll-ups.
    rollup_fold_s: float = Field(default=1.0, gt=0, le=3600)
    future_skew_s: int = Field(default=300, ge=0)
    max_kwh_per_reading: float = Field(default=1000.0, gt=0, le=1e12)
    rejection_payload_max_bytes: int = Field(default=2048, ge=64)
    # The newest rejections kept (about 2.5 KB each at most): oldest out first, drops counted.
    rejections_max_rows: int = Field(default=100_000, ge=100)
    # A device whose newest reading is older than this is silent (the `/metrics` gauge, the
    # overview's count, the alert rule); `GET /v1/devices?silentFor=` asks for any other span.
    silent_after_s: int = Field(default=900, ge=1)
    # How often the daemon counts silent devices and vehicles below the efficiency threshold
    # (for `/metrics`): from the latest-state tables, one statement, on the operators' pool.
    census_interval_s: float = Field(default=30.0, gt=0, le=3600)
    # The hourly roll-ups outlive the raw history: kept this long, dropped by upkeep.
    rollup_retention_days: int = Field(default=730, ge=1)
    # With a directory, each raw day partition is exported to Parquet before retention drops it.
    archive_dir: Path | None = None

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_batch_readings: int = Field(default=10_000, ge=1)
    http_commit_timeout_s: float = Field(default=10.0, gt=0)
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_body_timeout_s: float = Field(default=60.0, gt=0)
    http_keepalive_s: int = Field(default=5, ge=1)
    http_max_connections: int = Field(default=10_000, ge=16)
    # A request's head (request line and headers) is refused early past these: 414 for the
    # line, 431 for the headers; what is read before the refusal is bounded by them.
    http_max_request_line_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    http_max_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576)
    http_max_headers: int = Field(default=100, ge=8, le=10_000)
    ingest_api_keys: str = Field(default="", description="comma-separated bearer keys")
    operator_api_keys: str = Field(default="", description="comma-separated bearer keys")

    # Operators' reads: a server-side statement timeout, and at most this many analytics
    # reads (fleet, one vehicle, series) at once; the others wait READ_QUEUE_TIMEOUT_S for a
    # turn, then get 503 + Retry-After. What PostgreSQL spends on reads is bounded; the
    # write path has connections of its own.
    analytics_statement_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    analytics_max_concurrent: int = Field(default=2, ge=1, le=64)
    read_queue_timeout_s: float = Field(default=2.0, gt=0, le=60)

    alert_efficiency_threshold: float = Field(default=0.85, ge=0)
    analytics_default_window_h: int = Field(default=24, ge=1)
    analytics_max_window_days: int = Field(default=31, ge=1)

    var_dir: Path = Path("var")
    embedded_pg_port: int = Field(default=5433, ge=0, le=65535)
    embedded_mqtt_port: int = Field(default=1883, ge=0, le=65535)
    log_level: str = "INFO"
    # `json`: one JSON object a line (time, level, logger, event, and context keys).
    log_format: Literal["text", "json"] = "text"
    # Below Docker's stop grace period (10 s by default; docker-compose.yml sets 15 s): the
    # daemon has flushed and disconnected before it would be killed.
    shutdown_timeout_s: float = Field(default=8.0, gt=0)

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in (*PLAIN_SCHEMES, *TLS_SCHEMES) or not parts.hostname:
                raise ValueError("must look like mqtt[s]://[user:password@]host[:port]")
            try:
                parts.port  # noqa: B018 - raises on a port out of range
            except ValueError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("archive_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `ARCHIVE_DIR=` is no archive (as an empty DATABASE_READ_URL is no replica), not the
        # working directory: partitions would be dropped for files in a throwaway place.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("mqtt_ca_file", "mqtt_client_cert_file", "mqtt_client_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _tls_settings_need_mqtts(self) -> Settings:
        tls_files = (self.mqtt_ca_file, self.mqtt_client_cert_file, self.mqtt_client_key_file)
        if any(tls_files) and not MqttEndpoint(self.mqtt_url or "").tls:
            # Not silently in clear: files for TLS mean the operator expects TLS.
            raise ValueError("MQTT_CA_FILE / MQTT_CLIENT_*_FILE need an mqtts:// MQTT_URL")
        if self.mqtt_client_key_file and not self.mqtt_client_cert_file:
            raise ValueError("MQTT_CLIENT_KEY_FILE needs MQTT_CLIENT_CERT_FILE")
        return self

    @property
    def flush_interval_s(self) -> float:
        return self.flush_interval_ms / 1000.0

    @property
    def api_keys(self) -> dict[str, frozenset[str]]:
        """Bearer key → its roles; empty when the API is open (the demo default)."""
        roles: dict[str, set[str]] = {}
        for role, listed in (
            ("ingest", self.ingest_api_keys),
            ("operator", self.operator_api_keys),
        ):
            for key in filter(None, (k.strip() for k in listed.split(","))):
                roles.setdefault(key, set()).add(role)
        return {key: frozenset(r) for key, r in roles.items()}


PLAIN_SCHEMES = ("mqtt", "tcp")
TLS_SCHEMES = ("mqtts", "ssl")
DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


class MqttEndpoint:
    """Host, port, TLS and credentials parsed from MQTT_URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme in TLS_SCHEMES
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (DEFAULT_MQTTS_PORT if self.tls else DEFAULT_MQTT_PORT)
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def __repr__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class BadConfiguration(Exception):
    """Names each bad variable and what is wrong with it."""


def settings_or_raise() -> Settings:
    """The configuration from the environment, or BadConfiguration."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()
        )
        raise BadConfiguration(f"bad configuration: {problems}") from None


def settings_or_exit() -> Settings:
    """The configuration from the environment, or the process exits naming each bad
    variable and what is wrong with it."""
    try:
        return settings_or_raise()
    except BadConfiguration as error:
        sys.exit(f"energy-ingest: {error}")
