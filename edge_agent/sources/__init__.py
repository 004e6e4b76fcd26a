"""Where readings come from: files, stdin, sockets, a local MQTT topic."""
