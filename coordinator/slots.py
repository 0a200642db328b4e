"""Redis Cluster's slot map: which master serves which of the 16,384 hash slots.

Read from ``CLUSTER SLOTS`` (rows of ``[first, last, [host, port, id, ...], replicas...]``)
by the parts that keep connections of their own per shard: the script lane
(``cluster_lane.py``) and the sharded subscription (``sharded.py``). redis-py's cluster
client keeps its own map for everything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

SLOTS = 16384

Address = tuple[str, int]


def slot_of(key: str) -> int:
    """The hash slot of ``key`` (its ``{tag}`` when it has one)."""
    return int(key_slot(key.encode()))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class SlotMap:
    """Each slot's master, as one ``CLUSTER SLOTS`` reply said."""

    masters: tuple[Address, ...]  # the shards' masters, sorted
    owner: bytes  # slot -> index into masters (255: not served)

    @classmethod
    def parse(cls, reply: Iterable[Any]) -> SlotMap:
        ranges = []
        for row in reply:
            first, last, master = int(row[0]), int(row[1]), row[2]
            ranges.append((first, last, (_text(master[0]), int(master[1]))))
        masters = tuple(sorted({address for _, _, address in ranges}))
        if len(masters) > 254:
            raise ValueError("more than 254 shards")
        index = {address: i for i, address in enumerate(masters)}
        owner = bytearray(b"\xff" * SLOTS)
        for first, last, address in ranges:
            owner[first : last + 1] = bytes([index[address]]) * (last - first + 1)
        return cls(masters, bytes(owner))

    def master_of(self, slot: int) -> Address | None:
        i = self.owner[slot]
        return None if i == 255 else self.masters[i]

    def covered(self) -> bool:
        return b"\xff" not in self.owner

    def slots_of(self, master: Address) -> set[int]:
        i = self.masters.index(master)
        return {slot for slot, owner in enumerate(self.owner) if owner == i}


def tag_in(slots: set[int], stem: str) -> str:
    """A hash tag ``{stem:N}`` whose slot is one of ``slots`` (a channel of a shard's own,
    for the subscription probe that shard carries)."""
    for n in range(100_000):
        tag = f"{{{stem}:{n}}}"
        if slot_of(tag) in slots:
            return tag
    raise ValueError("no tag found for the shard's slots")
