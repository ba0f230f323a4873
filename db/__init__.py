"""PostgreSQL: the pool, migrations, partition upkeep, the flush transaction and the reads.

Nothing here knows MQTT or HTTP; callers hand in plain rows.
"""
