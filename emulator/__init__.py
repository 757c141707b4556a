"""A local ComfyUI Deploy (V2 API) emulator, for tests and for `make run` without an API key.

It follows `shared/reference/comfydeploy-api.md`, quirks included: the same routes, bodies, status
codes and error bodies, runs that move through the real statuses on a configurable clock, webhooks
with the real payloads and retry policy, and fault injection under `/_emulator/` so clients can be
tested against rate limits, outages, dropped connections and lost responses.
"""
