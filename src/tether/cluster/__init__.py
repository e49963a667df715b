"""Several Tether nodes over one PostgreSQL store: events, node memory, resync."""

from tether.cluster._events import CHANNEL, DROP_TRIGGERS_SQL, TRIGGERS_SQL, Event, decode_event
from tether.cluster._memory import NodeMemory
from tether.cluster._node import Node, join

__all__ = [
    "CHANNEL",
    "DROP_TRIGGERS_SQL",
    "TRIGGERS_SQL",
    "Event",
    "Node",
    "NodeMemory",
    "decode_event",
    "join",
]
