"""MQTT: the packet codec, the daemon's subscriber, its intake, the topics, and a fast
publisher for the simulator and the benchmarks."""
