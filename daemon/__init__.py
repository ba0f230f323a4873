"""The daemon: configuration, reading validation, the shared write path and the lifecycle."""
