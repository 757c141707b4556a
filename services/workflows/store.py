"""What the workflows servicer needs from the catalog's storage (CONVENTIONS.md §11).

``cache.CatalogCache`` (Redis, shared by replicas, with a short in-process layer) is the
implementation that runs; the servicer knows only ``CatalogStore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .catalog import CatalogIndex


@dataclass
class Counters:
    """This replica's counters (GetCatalogStats reports them as they are, per replica)."""

    hits: int = 0  # lookups answered from a loaded catalog
    misses: int = 0  # lookups that had to wait for a load
    upstream_healthy: bool = True  # the last refresh reached ComfyUI Deploy
    refused: int = 0  # upstream calls the client's circuit breaker refused (never sent)


class CatalogStore(Protocol):
    counters: Counters

    @property
    def ttl_seconds(self) -> float:
        """The catalog's time to live (older: stale, refreshed in the background)."""
        ...

    def now(self) -> float:
        """Epoch seconds on the store's clock (the one catalog ages are measured with)."""
        ...

    def current(self) -> CatalogIndex | None:
        """The catalog if it can be used right now with no I/O, else None (then call ``index``)."""
        ...

    async def index(self, count: bool = True) -> CatalogIndex:
        """The catalog to answer a lookup from; ``count``: the call is a lookup (hits, misses).
        UNAVAILABLE (CATALOG_UNAVAILABLE) when none can be loaded."""
        ...

    async def refresh(self) -> CatalogIndex:
        """Reload from ComfyUI Deploy now; UNAVAILABLE (CATALOG_REFRESH_FAILED) if that fails."""
        ...

    async def shared_stats(self) -> dict[str, str]:
        """Statistics every replica shares: refreshes, refresh_failures, last_error, last_refresh_ms,
        last_duration_ms."""
        ...

    def upstream_errors(self) -> int:
        """This replica's failed upstream attempts (calls refused by the breaker are not attempts)."""
        ...
