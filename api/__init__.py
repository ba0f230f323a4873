"""HTTP: the Starlette app for ingestion-compatible routes and operator reads."""
