-- Readings history (cold), latest state (hot), charging sessions and rejections.
-- The device id leads every history key, so the cold tables can later be hash-distributed
-- by device (Citus) or turned into hypertables (TimescaleDB) without redesign.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE meter_readings (
    meter_id        text             NOT NULL,
    ts              timestamptz      NOT NULL,
    kwh_consumed_ac double precision NOT NULL CHECK (kwh_consumed_ac >= 0 AND kwh_consumed_ac < 'Infinity'),
    voltage         double precision NOT NULL CHECK (voltage BETWEEN 0 AND 1000),
    received_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE vehicle_readings (
    vehicle_id       text             NOT NULL,
    ts               timestamptz      NOT NULL,
    soc              double precision NOT NULL CHECK (soc BETWEEN 0 AND 100),
    kwh_delivered_dc double precision NOT NULL CHECK (kwh_delivered_dc >= 0 AND kwh_delivered_dc < 'Infinity'),
    battery_temp     double precision NOT NULL CHECK (battery_temp BETWEEN -50 AND 120),
    received_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, ts)
) PARTITION BY RANGE (ts);

-- One row per device: the newest reading by its own timestamp, never by arrival order.
CREATE TABLE meter_latest (
    meter_id        text             PRIMARY KEY,
    ts              timestamptz      NOT NULL,
    kwh_consumed_ac double precision NOT NULL,
    voltage         double precision NOT NULL,
    received_at     timestamptz      NOT NULL
);

CREATE TABLE vehicle_latest (
    vehicle_id       text             PRIMARY KEY,
    ts               timestamptz      NOT NULL,
    soc              double precision NOT NULL,
    kwh_delivered_dc double precision NOT NULL,
    battery_temp     double precision NOT NULL,
    received_at      timestamptz      NOT NULL
);

-- A vehicle charges on one meter at a time: at most one open session per vehicle, and
-- the sessions of one vehicle never overlap (the exclusion constraint needs btree_gist).
CREATE TABLE charging_sessions (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle_id text        NOT NULL,
    meter_id   text        NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz,
    CHECK (ended_at IS NULL OR ended_at > started_at),
    EXCLUDE USING gist (vehicle_id WITH =, tstzrange(started_at, ended_at) WITH &&)
);
CREATE UNIQUE INDEX charging_sessions_one_open_per_vehicle
    ON charging_sessions (vehicle_id) WHERE ended_at IS NULL;
CREATE INDEX charging_sessions_meter ON charging_sessions (meter_id, started_at);

CREATE TABLE rejections (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    timestamptz NOT NULL DEFAULT now(),
    source         text        NOT NULL CHECK (source IN ('mqtt', 'http')),
    topic_or_route text        NOT NULL,
    payload        text        NOT NULL,
    reason         text        NOT NULL
);
CREATE INDEX rejections_received_at ON rejections (received_at DESC);
