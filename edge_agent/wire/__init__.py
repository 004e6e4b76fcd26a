"""What travels on the wire: MQTT payloads, topics and their schema version."""
