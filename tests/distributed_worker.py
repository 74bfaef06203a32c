"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (and in the test's own
process as the one-process reference): every measurement of tests/driver_cases.py through the
results cache at ``sys.argv[1]``, and each top-k% measurement on the tied rows too; one launch for
all of them (torchrun's start-up costs seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

from driver_cases import CASES, SPECS, TIES, data, model, options


def measure_all(out: Path) -> None:
    from selfrepair.measure import Cache

    cache = Cache(out)
    for name in CASES:
        cache.get(SPECS[name], model(), data(name), options(name))
    for name in TIES:  # batches of 7 rows: the ranks' shards and batches cut through repeated rows
        cache.get(SPECS[name], model(), data(name, tied=True), options(name, batch_size=7, max_rows=64))


if __name__ == "__main__":
    from selfrepair.distributed import close

    try:
        measure_all(Path(sys.argv[1]))
    finally:
        close()
