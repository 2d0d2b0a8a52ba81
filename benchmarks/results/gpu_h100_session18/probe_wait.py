"""Which part of BlockMover.save waits for the device (session 18, run 4): each part is run twice after the step's
stream is made busy for a second; "waited" is whether the busy work had finished when the part returned."""
import os

import torch

from moeserve.device_copy import to_device
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.latent_cache import allocate_latent_caches, take_rows
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.store import MemoryStore

LAYOUT = BlockLayout("0123456789abcdef0123456789abcdef", "float32", 4, 0, 0, 2, 3)
caches = allocate_latent_caches([0, 1], 16, 4, 3, torch.float32, torch.device("cuda"))
mover = BlockMover(caches, LAYOUT, 8, MemoryStore(), write_queue_bytes=8 * LAYOUT.payload_bytes)
assert mover.writer is not None


def busy() -> torch.cuda.Event:
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    event = torch.cuda.Event()
    event.record()
    return event


PARTS = [
    ("tensor.pin_memory", lambda: torch.tensor([1, 2, 3]).pin_memory()),
    ("to_device", lambda: to_device(torch.tensor([1, 2, 3]), torch.device("cuda"))),
    ("gather", lambda: mover._gather([3, 4, 5])),
    ("take_rows", lambda: take_rows(mover._gather([3, 4, 5, 6]), [0, 2])),
    ("as_values", lambda: mover.writer.as_values(mover._gather([3, 4, 5]), [0, 2])),
    ("event", lambda: torch.Event(device=torch.device("cuda")).record()),
    ("take_slots", lambda: mover.writer.take_slots(2)),
]
for name, part in PARTS:
    for _ in range(2):
        event = busy()
        part()
        print(name, "waited:", event.query(), flush=True)
event = busy()
mover.save([3, 4, 5], [0, 1, 2], [1, 2, 3], [(1,) * 4] * 3, [False] * 3)
print("save host only waited:", event.query())
event = busy()
mover.save([3, 4, 5], [-1, -1, -1], [1, 2, 3], [(1,) * 4] * 3, [True] * 3)
print("save store only waited:", event.query())
mover.flush()
os._exit(0)
