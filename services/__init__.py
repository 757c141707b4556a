"""The StationThis gRPC services."""
