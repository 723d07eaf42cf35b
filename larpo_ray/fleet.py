"""The actors of each role and their health, in one place: which actor holds each slot, how often
it died, whether Ray restarts it or a new actor replaces it, and which weight version each
generator holds.

`RayRuntime` (larpo_ray/topology.py) builds one `Fleet`; its rollout dispatcher asks it which actor
to call and tells it when one died; the weight sync tells it which generators loaded a version.
No Ray here: an actor is an opaque handle and a replacement comes from the `spawn` function the
runtime passes in, so the rules are tested without a cluster (tests/test_fleet.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

GENERATOR = "generator"  # the role whose actors hold policy weights

Death = Literal["restarting", "replaced"]


class Fleet:
    """Actors by role ("generator", "reward") and slot (0..n-1).

    Deaths: Ray restarts a slot's actor in place (same handle) up to `max_restarts` times; the
    death after that replaces it with `spawn(role, slot)`, and the slot's incarnation goes up, so a
    reply from the old actor can be told from one of the new. A slot's death count is that of its
    current actor.

    Weights: `set_weights` records the version every generator should hold, with a reference to
    the weights (None after a broadcast, which leaves none: `fetch_weights()` makes one when a
    generator needs it). Every generator starts on the initial policy (version 0), and a dead one
    holds no known version until it loads again.
    """

    def __init__(
        self,
        actors: dict[str, list],
        spawn: Callable[[str, int], object],
        max_restarts: int,
        fetch_weights: Callable[[], object],
    ) -> None:
        self._actors = {role: list(handles) for role, handles in actors.items()}
        self._spawn, self._max_restarts, self._fetch_weights = spawn, max_restarts, fetch_weights
        slots = [(role, i) for role, handles in self._actors.items() for i in range(len(handles))]
        self._incarnation = dict.fromkeys(slots, 0)
        self._deaths = dict.fromkeys(slots, 0)
        self._weights: tuple[int, object] | None = None  # None: no sync yet, all hold the initial policy
        self._held: list[int | None] = [0] * len(self._actors.get(GENERATOR, []))  # None: unknown

    # actors and their deaths

    def actors(self, role: str) -> list:
        """The current actors of `role`, by slot (a copy: replacing one goes through the fleet)."""
        return list(self._actors[role])

    def actor(self, role: str, slot: int):
        return self._actors[role][slot]

    def incarnation(self, role: str, slot: int) -> int:
        """How many times the slot's actor was replaced: a call remembers it to tell whether its
        actor is still the slot's one when it fails."""
        return self._incarnation[(role, slot)]

    def record_death(self, role: str, slot: int) -> Death:
        """The slot's actor died: "restarting" while it has restarts left (Ray brings it back),
        else "replaced" (a new actor from `spawn` holds the slot). A generator loses its weights
        either way."""
        key = (role, slot)
        self._deaths[key] += 1
        if role == GENERATOR:
            self.mark_stale(slot)
        if self._deaths[key] <= self._max_restarts:
            return "restarting"
        self._actors[role][slot] = self._spawn(role, slot)
        self._deaths[key] = 0
        self._incarnation[key] += 1
        return "replaced"

    # weights

    @property
    def version(self) -> int:
        """The weight version every generator should hold (0: the initial policy)."""
        return self._weights[0] if self._weights is not None else 0

    @property
    def weights(self) -> tuple[int, object] | None:
        """(version, reference or None) of the last sync; None before the first."""
        return self._weights

    def set_weights(self, version: int, ref: object | None) -> None:
        """The weights every generator should hold from now on (`ref`: None when the sync left no
        reference to them). Which generators loaded them is told with `loaded`."""
        self._weights = (version, ref)

    def current_weights(self) -> tuple[int, object]:
        """(version, reference) for a generator that must load them; a missing reference is
        fetched once (`fetch_weights`), when first needed."""
        if self._weights is None:
            raise RuntimeError("no weights were synced yet: every generator holds the initial policy")
        version, ref = self._weights
        if ref is None:
            ref = self._fetch_weights()
            self._weights = (version, ref)
        return version, ref

    def loaded(self, slot: int, version: int) -> None:
        """Generator `slot` holds weights `version` (or has been sent them ahead of its next call)."""
        self._held[slot] = version

    def mark_stale(self, slot: int) -> None:
        """Generator `slot` may not hold the current weights (it died, or a load failed or
        answered with another version): it loads them before its next call."""
        self._held[slot] = None

    def needs_weights(self, slot: int) -> bool:
        """Whether generator `slot` must load `current_weights()` before its next call."""
        return self._weights is not None and self._held[slot] != self._weights[0]
