-- Analytics sums a window of one device's readings. The readings of a device are spread
-- over the heap (they arrive interleaved with every other device's), so reading them row by
-- row visited one heap page per reading: 288 pages per device per day at one reading every
-- 5 minutes. With the summed values carried in the primary key's index, the same query is
-- an index-only scan of a few pages (p50 1.9 ms -> 0.8 ms measured at the database for a
-- 24 h window of a 2,000-device fleet; BENCHMARKS.md). The key itself does not change.
ALTER TABLE meter_readings
    DROP CONSTRAINT meter_readings_pkey,
    ADD CONSTRAINT meter_readings_pkey PRIMARY KEY (meter_id, ts) INCLUDE (kwh_consumed_ac);
ALTER TABLE vehicle_readings
    DROP CONSTRAINT vehicle_readings_pkey,
    ADD CONSTRAINT vehicle_readings_pkey
        PRIMARY KEY (vehicle_id, ts) INCLUDE (kwh_delivered_dc, battery_temp);
