-- Two rules the tables now keep themselves.
--
-- 1. The latest state is a row of the history. The flush used to pick the latest row of a
--    device from everything offered (so that two readings at one moment with other values
--    could leave the history with one and the latest state with the other); it now takes it
--    from what the history stored. Rows written before that are mended here.
UPDATE meter_latest l
SET kwh_consumed_ac = h.kwh_consumed_ac, voltage = h.voltage, received_at = h.received_at
FROM meter_readings h
WHERE h.meter_id = l.meter_id AND h.ts = l.ts
  AND (h.kwh_consumed_ac, h.voltage) IS DISTINCT FROM (l.kwh_consumed_ac, l.voltage);

UPDATE vehicle_latest l
SET soc = h.soc, kwh_delivered_dc = h.kwh_delivered_dc, battery_temp = h.battery_temp,
    received_at = h.received_at
FROM vehicle_readings h
WHERE h.vehicle_id = l.vehicle_id AND h.ts = l.ts
  AND (h.soc, h.kwh_delivered_dc, h.battery_temp)
      IS DISTINCT FROM (l.soc, l.kwh_delivered_dc, l.battery_temp);

-- 2. A meter charges one vehicle at a time: the sessions of one meter never overlap, as those
--    of one vehicle never did. Linking a vehicle to a meter used to leave another vehicle's
--    open session on that meter open, so that both counted its energy. Each session that
--    overlaps the next one on its meter now ends where that one begins; one that began at
--    the very instant of another on its meter (nothing left of it) is removed. What changed
--    is said in the log of `energy-ingest migrate` (a NOTICE) and kept in
--    `charging_sessions_closed_by_migration`.
CREATE TABLE charging_sessions_closed_by_migration (
    id          bigint      NOT NULL,
    vehicle_id  text        NOT NULL,
    meter_id    text        NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,           -- as it was
    became      timestamptz,           -- its end now; NULL: removed
    migrated_at timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE
    ended bigint;
    removed bigint;
BEGIN
    CREATE TEMPORARY TABLE overlapping ON COMMIT DROP AS
    SELECT id, vehicle_id, meter_id, started_at, ended_at, next_start FROM (
        SELECT s.*, lead(started_at) OVER (PARTITION BY meter_id ORDER BY started_at, id)
                    AS next_start
        FROM charging_sessions s
    ) o
    WHERE next_start IS NOT NULL AND (ended_at IS NULL OR ended_at > next_start);

    INSERT INTO charging_sessions_closed_by_migration
        (id, vehicle_id, meter_id, started_at, ended_at, became)
    SELECT id, vehicle_id, meter_id, started_at, ended_at,
           CASE WHEN next_start > started_at THEN next_start END
    FROM overlapping;

    DELETE FROM charging_sessions s USING overlapping o
    WHERE s.id = o.id AND o.next_start <= o.started_at;
    GET DIAGNOSTICS removed = ROW_COUNT;
    UPDATE charging_sessions s SET ended_at = o.next_start
    FROM overlapping o WHERE s.id = o.id AND o.next_start > o.started_at;
    GET DIAGNOSTICS ended = ROW_COUNT;
    IF ended > 0 OR removed > 0 THEN
        RAISE NOTICE 'charging_sessions: % sessions that overlapped a later one on the same meter now end where it begins, % that began at the same instant as another on their meter removed (charging_sessions_closed_by_migration lists them)', ended, removed;
    END IF;
END $$;

ALTER TABLE charging_sessions
    ADD CONSTRAINT charging_sessions_one_vehicle_per_meter
    EXCLUDE USING gist (meter_id WITH =, tstzrange(started_at, ended_at) WITH &&);
CREATE UNIQUE INDEX charging_sessions_one_open_per_meter
    ON charging_sessions (meter_id) WHERE ended_at IS NULL;

-- A vehicle's sessions, newest first (GET /v1/links?vehicleId=…), and those of a window
-- (analytics: `tstzrange(started_at, ended_at) && window`, served by the exclusion
-- constraints' GiST indexes): in time proportional to the sessions asked for, whatever a
-- vehicle's past holds.
CREATE INDEX charging_sessions_vehicle ON charging_sessions (vehicle_id, started_at);
