"""What a node accepts from its peers, and who may delete what (pure).

Connection trust is not content trust: a peer that passed mutual TLS may still relay
events that are forged, from a clock far ahead, or deletes of instances their author has
no say over. The catalog asks this policy about every received event, before it is
stored (see :meth:`syncnode.catalog.Catalog.apply`):

1. **Authentic.** A signed event is taken only if its signature verifies against the
   certificate of its ``origin`` (:mod:`syncnode.signing`). An unsigned (legacy, format
   version 1) event is refused unless ``accept_unsigned`` is set for an upgrade, and
   even then never one that claims this node as its origin (this node signs all it makes).
2. **Bounded clocks.** An event whose HLC is more than ``max_clock_skew_ms`` ahead of
   the local wall clock is refused (not stored, so not relayed) until the local clock
   catches up; this node's own clock never moves past ``now + max_clock_skew_ms``.
3. **Delete authority.** A delete removes a put only if :meth:`Policy.may_remove` says
   so: by default when the delete's origin is the put's origin, this node itself, or a
   node listed in ``may_delete``; with ``delete_authority="any"``, any authentic delete
   does (the behaviour before this policy existed). A delete without authority over a
   put is still stored and relayed (its author did say it; other nodes may list that
   author) but does not remove that put here. A node that renewed its certificate
   (:mod:`syncnode.renewal`) has a new id; ``lineage`` maps each renewed id to the first id
   of its chain, and authority compares lineages: the renewed node may delete what it put
   under its old id, and a ``may_delete`` entry covers every id of its lineage.
4. **Bounded unknown tombstones.** A delete naming put ids this node has not seen yet
   waits for them in a bounded table: at most ``max_unknown_per_origin`` such names per
   origin and ``max_unknown_total`` in all, each forgotten after ``unknown_ttl_s``. A
   delete that would exceed a bound is refused for now (sync retries it later, when its
   puts have arrived or old names have expired).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

DAY_MS = 86_400_000
DEFAULT_MAX_CLOCK_SKEW_MS = DAY_MS
DEFAULT_MAX_UNKNOWN_PER_ORIGIN = 10_000
DEFAULT_MAX_UNKNOWN_TOTAL = 100_000
DEFAULT_UNKNOWN_TTL_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Policy:
    """One node's rules for received events (see the module docstring)."""

    local_node: str = ""
    may_delete: frozenset[str] = field(default_factory=frozenset)
    delete_authority: Literal["origin", "any"] = "origin"
    accept_unsigned: bool = False
    max_clock_skew_ms: int | None = DEFAULT_MAX_CLOCK_SKEW_MS  # None: unbounded (legacy)
    max_unknown_per_origin: int = DEFAULT_MAX_UNKNOWN_PER_ORIGIN
    max_unknown_total: int = DEFAULT_MAX_UNKNOWN_TOTAL
    unknown_ttl_s: float = DEFAULT_UNKNOWN_TTL_S
    lineage: Mapping[str, str] = field(default_factory=dict)  # renewed id -> first id

    def may_remove(self, delete_origin: str, put_origin: str) -> bool:
        """Whether a delete made by ``delete_origin`` removes a put made by ``put_origin``."""
        if (self.delete_authority == "any" or delete_origin == put_origin
                or delete_origin == self.local_node or delete_origin in self.may_delete):
            return True
        if not self.lineage:
            return False
        root = self.lineage.get
        author = root(delete_origin, delete_origin)
        return (author == root(put_origin, put_origin)
                or author == root(self.local_node, self.local_node)
                or any(root(m, m) == author for m in self.may_delete))

    def unsigned_refusal(self, origin: str) -> str | None:
        """Why an unsigned event of ``origin`` is refused, or None if it is taken."""
        if origin == self.local_node:
            return ("unsigned event claims this node as its origin: this node signs every "
                    "event it makes, so it is forged")
        if not self.accept_unsigned:
            return ("unsigned event (made before event signing); refused unless "
                    "accept_unsigned_events is set while a cluster upgrades")
        return None

    def clock_refusal(self, hlc: int, limit: int) -> str | None:
        """Why an event with clock ``hlc`` is refused now, given the HLC ``limit``
        (:func:`syncnode.events.hlc_limit` of ``max_clock_skew_ms``), or None."""
        if self.max_clock_skew_ms is not None and hlc > limit:
            return (f"event clock is more than {self.max_clock_skew_ms // 1000} s ahead "
                    f"of this node's clock; refused until the local clock catches up")
        return None


PERMISSIVE = Policy(delete_authority="any", accept_unsigned=True,
                    max_clock_skew_ms=None, max_unknown_per_origin=2**62,
                    max_unknown_total=2**62, unknown_ttl_s=float("inf"))
"""The rules of catalogs before this policy existed, for tests of the live-view rule
alone. Never a node's configuration."""
