"""--max-cost-usd: a small Ray actor that the model actors ask before they start a shard and tell what each batch
cost. Once this run's spend reaches the cap no new shard starts; a shard already started is finished (its other
chunks are always admitted), so everything written stays whole. The spend is counted where it happens, on the
model actors, so the cap does not wait for results to reach the driver."""
from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class CostGate:
    def __init__(self, cap_usd: float):
        self.cap_usd, self.spent_usd = cap_usd, 0.0
        self.started: set[str] = set()
        self.refused: set[str] = set()

    def admit(self, shards: list[str]) -> list[str]:
        """The shards of `shards` that may run: started ones, and new ones while the spend is under the cap. A shard
        refused once stays refused, so none is cut in two."""
        for shard in shards:
            if shard not in self.started and shard not in self.refused:
                (self.started if self.spent_usd < self.cap_usd else self.refused).add(shard)
        return [s for s in shards if s in self.started]

    def spend(self, cost_usd: float) -> None:
        self.spent_usd += cost_usd
