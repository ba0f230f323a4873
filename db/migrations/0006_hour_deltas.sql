-- The hourly roll-ups leave the flush. The flush appends what it stored to these tables, one
-- row per device and hour it touched, with no index and no conflict to resolve (in the same
-- statement as the history's insert, so a reading is added here exactly when it is stored).
-- The daemon's housekeeping folds them into the roll-ups every ROLLUP_FOLD_S: each row is
-- deleted and added to its hour in one statement, so it is counted in the roll-ups or here,
-- never both, never neither. Readers read both together, through the *_hourly_all views.

CREATE TABLE meter_hour_deltas (
    meter_id        text             NOT NULL,
    hour            timestamptz      NOT NULL,
    kwh_consumed_ac double precision NOT NULL,
    readings        integer          NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 50000);

CREATE TABLE vehicle_hour_deltas (
    vehicle_id       text             NOT NULL,
    hour             timestamptz      NOT NULL,
    kwh_delivered_dc double precision NOT NULL,
    readings         integer          NOT NULL,
    battery_temp_sum double precision NOT NULL,
    last_ts          timestamptz      NOT NULL,
    last_soc         double precision NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 50000);

-- An hour of a device may have a row in the roll-ups and rows here: sum them (and take the
-- SoC of the newest `last_ts`).
CREATE VIEW meter_hourly_all AS
    SELECT meter_id, hour, kwh_consumed_ac, readings FROM meter_hourly
    UNION ALL
    SELECT meter_id, hour, kwh_consumed_ac, readings FROM meter_hour_deltas;

CREATE VIEW vehicle_hourly_all AS
    SELECT vehicle_id, hour, kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc
    FROM vehicle_hourly
    UNION ALL
    SELECT vehicle_id, hour, kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc
    FROM vehicle_hour_deltas;
