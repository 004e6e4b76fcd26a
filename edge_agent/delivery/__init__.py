"""Where a message is stored and sent: the durable outbox and the MQTT link."""
