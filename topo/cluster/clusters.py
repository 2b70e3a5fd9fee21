"""`Cluster`: a group of (channel, offset) units, defined up to translation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

Member = tuple[int, int, int]  # (channel, dy, dx)


def kernel_for_extent(extent: int) -> int:
    """The smallest odd kernel (1, 3, 5, ...) whose window covers ``extent`` positions."""
    return extent if extent % 2 == 1 else extent + 1


def extent(members: Iterable[Member]) -> int:
    """The side of the smallest square of positions that holds every member's offset."""
    members = list(members)
    dys = [m[1] for m in members]
    dxs = [m[2] for m in members]
    return max(max(dys) - min(dys), max(dxs) - min(dxs)) + 1


def canonical_members(members: Iterable[Member]) -> tuple[Member, ...]:
    """Translate members so their footprint's bounding box sits at the window centre.

    The shift is ``-floor((min + max) / 2)`` per axis, so translated copies of
    one cluster map to the same tuple (sorted, duplicates removed).
    """
    members = set(members)
    if not members:
        return ()
    dys = [m[1] for m in members]
    dxs = [m[2] for m in members]
    sy = -((min(dys) + max(dys)) // 2)
    sx = -((min(dxs) + max(dxs)) // 2)
    return tuple(sorted((c, dy + sy, dx + sx) for c, dy, dx in members))


@dataclass(frozen=True)
class Cluster:
    """A candidate unit of the next layer.

    ``members`` are ``(channel, dy, dx)`` with offsets relative to the window
    centre after canonicalising translation (see `canonical_members`);
    ``kernel_size`` is the smallest of 1, 3, 5 (odd sizes) covering the
    footprint. ``votes`` (how many anchor channels recovered the cluster) is
    evidence, not identity, and does not take part in equality.
    """

    members: tuple[Member, ...]
    kernel_size: int
    votes: int = field(default=1, compare=False)

    @classmethod
    def from_members(cls, members: Iterable[Member], votes: int = 1) -> "Cluster":
        canon = canonical_members(members)
        if not canon:
            raise ValueError("a Cluster needs at least one member")
        return cls(members=canon, kernel_size=kernel_for_extent(extent(canon)), votes=votes)

    @property
    def channels(self) -> tuple[int, ...]:
        """Sorted unique channels the cluster draws on."""
        return tuple(sorted({m[0] for m in self.members}))

    @property
    def footprint(self) -> tuple[tuple[int, int], ...]:
        """Sorted unique offsets (dy, dx) the cluster covers."""
        return tuple(sorted({(m[1], m[2]) for m in self.members}))

    def __len__(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict:
        return {"members": [list(m) for m in self.members], "kernel_size": self.kernel_size,
                "votes": self.votes}

    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        members = tuple(tuple(int(v) for v in m) for m in d["members"])
        return cls(members=members, kernel_size=int(d["kernel_size"]), votes=int(d.get("votes", 1)))
