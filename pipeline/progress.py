"""The driver's progress bar: shards done (with tqdm's rate and ETA) and images done with their rate."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, shards_total: int, shards_done: int):
        interactive = sys.stderr.isatty()
        # In a job log (no TTY) every refresh is a new line: refresh about as often as Ray's own progress lines.
        self.bar = tqdm(total=shards_total, initial=shards_done, unit="shard", desc="trimlens", file=sys.stderr,
                        mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive)
        self.images = 0
        self.started = time.monotonic()

    def update(self, images: int, shards: int) -> None:
        self.images += images
        rate = self.images / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(images=self.images, img_per_s=f"{rate:.2f}", refresh=False)
        self.bar.update(shards)

    def close(self) -> None:
        self.bar.close()
