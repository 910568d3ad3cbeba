"""kill -9 mid-transfer: every instance the node acknowledged survives, intact.

storescu -v prints "Sending file: F" before each C-STORE and "Received Store Response
(Success)" after the node's answer; pairing them in order tells which files the node
acknowledged before it was killed. After a restart each of those must be indexed with
its file equal to the source, storage/tmp must be empty, and, once the rest of the
series is sent again, the study must complete exactly once.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    completions,
    dataset_bytes,
    index_query,
    kill9_mid_storescu,
    make_series,
    need_tool,
    stored_files,
    stored_path,
    storescu,
    study_state,
    uids,
)

N = 150
ROUNDS = 5


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("crash-series"), n=N, size=256, seed=7)


def _count(storage: Path) -> int:
    studies = storage / "studies"
    return sum(1 for _ in studies.rglob("*.dcm")) if studies.exists() else 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_mid_transfer_keeps_acknowledged_instances(node_factory: Any, series: list[Path],
                                                         tmp_path: Path) -> None:
    need_tool("storescu")
    rng = random.Random(20260101)
    study = uids(series[0])[0]
    source = {uids(p)[2]: p for p in series}
    for round_no in range(ROUNDS):
        node = node_factory({"completion": {"quiet_seconds": 4.0}}, name=f"crash{round_no}")
        node.start()
        kill_at = rng.randint(3, N - 10)
        log = tmp_path / f"storescu{round_no}.log"
        returncode, acked = kill9_mid_storescu(
            node, series, log, lambda n=node, k=kill_at: _count(n.storage) >= k,
            aet="CRASHSCU")
        assert returncode != 0, "storescu finished before the kill: not mid-transfer"
        assert 0 < len(acked) < N

        node.start()  # same storage
        assert list((node.storage / "tmp").iterdir()) == [], "partial files survived restart"
        indexed = dict(index_query(node.storage, "SELECT sop_instance_uid, path FROM instances"))
        for src in acked:
            sop = uids(src)[2]
            assert sop in indexed, f"round {round_no}: acknowledged {src.name} lost"
            out = node.storage / indexed[sop]
            assert out == stored_path(node.storage, *uids(src))
            assert dataset_bytes(out) == dataset_bytes(src), f"{src.name} damaged"
        for out in stored_files(node.storage):  # nothing half-written in place either
            assert dataset_bytes(out) == dataset_bytes(source[out.stem])
        for sop, rel in indexed.items():
            assert (node.storage / rel).is_file(), f"indexed {sop} has no file"

        # the rest of the series; then one completion with everything
        r = storescu(node.port, series, aet="CRASHSCU")
        assert r.returncode == 0, r.stderr
        assert index_query(node.storage, "SELECT count(*) FROM instances")[0][0] == N

        def complete(node: Any = node) -> bool:
            st = study_state(node, study)
            return bool(st and st["state"] == "complete")

        node.wait_for(complete, timeout=20, interval=0.2)
        time.sleep(1.0)
        assert [(c[1], c[3]) for c in completions(node.storage, study)] == [(1, N)], (
            f"round {round_no}: completions {completions(node.storage, study)}"
        )
        assert node.stop() == 0
