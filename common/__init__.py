"""Shared machinery of StationThis core: config, errors, logging, telemetry and the gRPC bootstrap."""
