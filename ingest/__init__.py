"""The readings core: what a reading is, how one is taken in (MQTT and HTTP alike), and the
write path that stores it once. It imports `db` and nothing else of the project."""
