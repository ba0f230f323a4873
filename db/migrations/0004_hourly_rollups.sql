-- Hourly roll-ups of the history, per device: what fleet analytics and charts read instead of
-- the raw rows (a fleet of 10,000 vehicles over 24 h is 240,000 hourly rows per stream,
-- against 14.4 million readings). The flush statement keeps them (db/writes.py): every
-- reading the history stores is added to its device's hour in the same statement, duplicates
-- and readings the history refuses are not, a late reading lands in its own hour. Partitioned
-- by day like the history, created ahead and dropped with it.

CREATE TABLE meter_hourly (
    meter_id        text             NOT NULL,
    hour            timestamptz      NOT NULL,  -- the hour's start, in UTC
    kwh_consumed_ac double precision NOT NULL,
    readings        integer          NOT NULL,
    PRIMARY KEY (meter_id, hour)
) PARTITION BY RANGE (hour);

CREATE TABLE vehicle_hourly (
    vehicle_id       text             NOT NULL,
    hour             timestamptz      NOT NULL,
    kwh_delivered_dc double precision NOT NULL,
    readings         integer          NOT NULL,
    battery_temp_sum double precision NOT NULL,
    last_ts          timestamptz      NOT NULL,  -- the hour's newest reading: its SoC
    last_soc         double precision NOT NULL,
    PRIMARY KEY (vehicle_id, hour)
) PARTITION BY RANGE (hour);

-- A whole fleet's window is read by time across every device: block-range indexes, tiny, and
-- cheap to keep since rows arrive in about the order of their time. (An index on a column an
-- update does not change keeps updates of the roll-ups HOT.)
CREATE INDEX meter_hourly_hour ON meter_hourly USING brin (hour);
CREATE INDEX vehicle_hourly_hour ON vehicle_hourly USING brin (hour);
CREATE INDEX meter_readings_ts ON meter_readings USING brin (ts);
CREATE INDEX vehicle_readings_ts ON vehicle_readings USING brin (ts);

-- The roll-ups of the history already stored: one partition for each day the history has.
-- (Each reading is summed as at most 1e300 kWh, as analytics reads it: rows stored before
-- MAX_KWH_PER_READING existed could otherwise overflow a sum.)
DO $$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT c.relname, p.relname AS parent, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE p.relname IN ('meter_readings', 'vehicle_readings')
          AND n.nspname = current_schema()
    LOOP
        -- Rows are rewritten in place all day long (the current hour of every device):
        -- room on each page keeps those updates HOT.
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF %I %s WITH (fillfactor = 70)',
            replace(part.relname, '_readings_', '_hourly_'),
            replace(part.parent, '_readings', '_hourly'),
            part.bound
        );
    END LOOP;
END $$;

INSERT INTO meter_hourly (meter_id, hour, kwh_consumed_ac, readings)
SELECT meter_id, date_trunc('hour', ts, 'UTC'), sum(least(kwh_consumed_ac, 1e300)), count(*)
FROM meter_readings
GROUP BY 1, 2;

INSERT INTO vehicle_hourly
    (vehicle_id, hour, kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc)
SELECT vehicle_id, date_trunc('hour', ts, 'UTC'), sum(least(kwh_delivered_dc, 1e300)), count(*),
       sum(battery_temp), max(ts), (array_agg(soc ORDER BY ts DESC))[1]
FROM vehicle_readings
GROUP BY 1, 2;
