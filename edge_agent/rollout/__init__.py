"""How a new model reaches a device and is tried: push, transfer, trial, the state machine."""
