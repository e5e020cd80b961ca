"""The convergence check lives with the one mesh builder (:mod:`meshward.testing.status_poll`),
which waits on it too; the tour and ``meshward demo --attach`` import it from here."""

from meshward.testing.status_poll import converged, fetch_status, lagging

__all__ = ["converged", "fetch_status", "lagging"]
