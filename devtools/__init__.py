"""Tools for `make run` and the tests: the local launcher and the embedded Redis server. Not service code."""
