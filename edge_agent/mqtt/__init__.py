"""One MQTT client session: connect, TLS, credentials, backoff — used by every MQTT user."""
