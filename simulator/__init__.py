"""Tools that drive the daemon from outside: a simulated fleet, its MQTT publisher, and the
benchmarks. `energy-ingest run` never imports this package."""
