"""MQTT, the daemon's side of it: one connection through the `mqtt5` codec (`connection`),
the session with its acknowledgements after commit (`subscriber`), the intake that turns a
delivery into a submission (`intake`), the topics, reason codes in words, and TLS."""
