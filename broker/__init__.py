"""MQTT: the subscriber (paho-mqtt driven by the asyncio loop) and the telemetry topics."""
