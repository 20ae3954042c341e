"""The nixl transport on the real NIXL library (UCX, host memory): two agents, one process."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import Export, ExportTable, KvMemory, TransportContext
from dynamo_gateway.errors import KvTransferError
from dynamo_gateway.settings import Settings

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.skipif(
        importlib.util.find_spec("nixl") is None,
        reason="NIXL is not installed (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)",
    ),
]

LAYOUT = KvLayout(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4, dtype="float16")
NUM_BLOCKS = 64


def _transport(worker_id: str, timeout_s: float = 30.0) -> object:
    from dynamo_gateway_nixl.factory import build_transport

    settings = Settings()
    settings.disagg.kv_transfer_timeout_s = timeout_s
    return build_transport(TransportContext(settings, worker_id, LAYOUT))


@dataclass
class Pair:
    src_memory: KvMemory
    dst_memory: KvMemory
    exports: ExportTable
    src: object
    dst: object
    src_desc: dict[str, object]
    dst_desc: dict[str, object]
    released: list[str] = field(default_factory=list)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    from dynamo_gateway_nixl.transport import NixlTransport

    src_memory = KvMemory.zeros(LAYOUT, NUM_BLOCKS)
    src_memory.array[...] = np.random.default_rng(0).integers(
        0, 256, src_memory.array.shape, dtype=np.uint8
    )
    dst_memory = KvMemory.zeros(LAYOUT, NUM_BLOCKS)
    src, dst = _transport("prefill-0"), _transport("decode-0")
    assert isinstance(src, NixlTransport) and isinstance(dst, NixlTransport)
    exports = ExportTable()
    src_desc = await src.start(src_memory, exports)
    dst_desc = await dst.start(dst_memory, ExportTable())
    p = Pair(src_memory, dst_memory, exports, src, dst, src_desc, dst_desc)
    try:
        yield p
    finally:
        await dst.aclose()
        await src.aclose()


def _export(p: Pair, transfer_id: str, blocks: tuple[int, ...]) -> None:
    p.exports.add(
        Export(
            transfer_id=transfer_id,
            block_ids=blocks,
            num_tokens=len(blocks) * LAYOUT.block_size,
            deadline=time.monotonic() + 30,
            release=lambda: p.released.append(transfer_id),
        )
    )


async def _wait_for(cond: object, timeout_s: float = 5.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_descriptor_is_json_and_connects(pair: Pair) -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    desc = pair.src_desc
    assert isinstance(pair.dst, NixlTransport)
    assert desc["agent"] != pair.dst_desc["agent"]
    assert str(desc["agent"]).startswith("prefill-0-")
    assert base64.b64decode(str(desc["metadata"]))
    assert desc["addr"] == pair.src_memory.array.__array_interface__["data"][0]
    assert (desc["num_blocks"], desc["page_bytes"], desc["planes"]) == (
        NUM_BLOCKS,
        LAYOUT.page_bytes,
        LAYOUT.planes,
    )
    import json

    assert json.loads(json.dumps(desc)) == desc
    assert pair.dst.can_connect(pair.dst_desc, desc)
    # A reader with memory needs the remote's pool; a memory-less one does not.
    assert not pair.dst.can_connect(pair.dst_desc, {"agent": "x", "metadata": "eA=="})
    assert pair.dst.can_connect({"agent": "y"}, {"agent": "x", "metadata": "eA=="})
    assert not pair.dst.can_connect({"agent": "y"}, {"agent": "x"})
    assert not pair.dst.can_connect(pair.dst_desc, {})


async def test_read_moves_exact_blocks_and_release_notifies(pair: Pair) -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    assert isinstance(pair.dst, NixlTransport)
    blocks = (5, 6, 7, 20, 40, 41)
    _export(pair, "t1", blocks)
    runs = [BlockRun(5, 0, 3), BlockRun(20, 10, 1), BlockRun(40, 62, 2)]

    moved = await pair.dst.read(pair.src_desc, "t1", runs, pair.dst_memory)

    assert moved == 6 * LAYOUT.block_bytes
    src, dst = pair.src_memory.array, pair.dst_memory.array
    touched = np.zeros(NUM_BLOCKS, dtype=bool)
    for run in runs:
        np.testing.assert_array_equal(
            dst[:, run.dst : run.dst + run.length], src[:, run.src : run.src + run.length]
        )
        touched[run.dst : run.dst + run.length] = True
    assert not dst[:, ~touched].any(), "blocks outside the runs were written"

    # A second read from the same peer reuses its loaded agent.
    assert await pair.dst.read(pair.src_desc, "t1", [BlockRun(7, 30, 1)], pair.dst_memory)
    np.testing.assert_array_equal(dst[:, 30], src[:, 7])

    assert pair.released == []
    await pair.dst.release(pair.src_desc, "t1")
    await _wait_for(lambda: pair.released == ["t1"])
    assert len(pair.exports) == 0


async def test_large_read(pair: Pair) -> None:
    # Every block, in one run: planes segments of num_blocks pages each.
    from dynamo_gateway_nixl.transport import NixlTransport

    assert isinstance(pair.dst, NixlTransport)
    moved = await pair.dst.read(pair.src_desc, "all", [BlockRun(0, 0, NUM_BLOCKS)], pair.dst_memory)
    assert moved == pair.src_memory.array.nbytes
    np.testing.assert_array_equal(pair.dst_memory.array, pair.src_memory.array)


async def test_memoryless_worker_still_releases() -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    src, dst = _transport("mocker-prefill"), _transport("mocker-decode")
    assert isinstance(src, NixlTransport) and isinstance(dst, NixlTransport)
    exports = ExportTable()
    released: list[str] = []
    exports.add(Export("m1", (1, 2), 8, time.monotonic() + 30, lambda: released.append("m1")))
    try:
        desc = await src.start(None, exports)
        local = await dst.start(None, ExportTable())
        assert set(desc) == {"agent", "metadata"}
        assert dst.can_connect(local, desc)  # it only releases: no memory needed
        with pytest.raises(KvTransferError, match="no KV memory"):
            await dst.read(desc, "m1", [BlockRun(1, 0, 2)], KvMemory.zeros(LAYOUT, 4))
        await dst.release(desc, "m1")
        await _wait_for(lambda: released == ["m1"])
    finally:
        await dst.aclose()
        await src.aclose()


async def test_runs_outside_either_pool_are_refused(pair: Pair) -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    assert isinstance(pair.dst, NixlTransport)
    with pytest.raises(KvTransferError, match="outside this pool"):
        await pair.dst.read(pair.src_desc, "t", [BlockRun(0, 63, 2)], pair.dst_memory)
    with pytest.raises(KvTransferError, match="outside the peer's pool"):
        await pair.dst.read(pair.src_desc, "t", [BlockRun(63, 0, 2)], pair.dst_memory)
    other = dict(pair.src_desc, page_bytes=LAYOUT.page_bytes * 2)
    with pytest.raises(KvTransferError, match="planes"):
        await pair.dst.read(other, "t", [BlockRun(0, 0, 1)], pair.dst_memory)


async def test_bogus_metadata_raises() -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    memory = KvMemory.zeros(LAYOUT, 8)
    dst = _transport("decode-1")
    assert isinstance(dst, NixlTransport)
    await dst.start(memory, ExportTable())
    bogus = {
        "agent": "nobody-1234",
        "metadata": base64.b64encode(b"not nixl metadata").decode(),
        "addr": 4096,
        "num_blocks": 8,
        "page_bytes": LAYOUT.page_bytes,
        "planes": LAYOUT.planes,
    }
    try:
        with pytest.raises(KvTransferError, match="cannot load NIXL agent"):
            await asyncio.wait_for(dst.read(bogus, "t", [BlockRun(0, 0, 1)], memory), 10)
        with pytest.raises(KvTransferError, match="malformed"):
            await dst.read(dict(bogus, metadata="!!"), "t", [BlockRun(0, 0, 1)], memory)
        with pytest.raises(KvTransferError):
            await dst.release(bogus, "t")
    finally:
        await dst.aclose()


async def test_read_from_closed_peer_fails_fast() -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    src_memory = KvMemory.zeros(LAYOUT, 8)
    dst_memory = KvMemory.zeros(LAYOUT, 8)
    src, dst = _transport("prefill-2"), _transport("decode-2", timeout_s=5.0)
    assert isinstance(src, NixlTransport) and isinstance(dst, NixlTransport)
    desc = await src.start(src_memory, ExportTable())
    await dst.start(dst_memory, ExportTable())
    try:
        # Connect first, so the peer's agent is known here when it goes away.
        await dst.read(desc, "warm", [BlockRun(0, 0, 1)], dst_memory)
        await src.aclose()
        del src
        import gc

        gc.collect()  # the agent shuts its UCX worker down when collected
        with pytest.raises((KvTransferError, OSError)):
            await asyncio.wait_for(dst.read(desc, "t", [BlockRun(0, 0, 1)], dst_memory), 10)
        # It forgot the broken peer; loading it again cannot reach it either.
        with pytest.raises((KvTransferError, OSError)):
            await asyncio.wait_for(dst.read(desc, "t", [BlockRun(0, 0, 1)], dst_memory), 10)
        with pytest.raises((KvTransferError, OSError)):
            await dst.release(desc, "t")
    finally:
        await dst.aclose()


async def test_read_before_start_raises() -> None:
    from dynamo_gateway_nixl.transport import NixlTransport

    memory = KvMemory.zeros(LAYOUT, 8)
    dst = _transport("decode-3")
    assert isinstance(dst, NixlTransport)
    desc = {
        "agent": "a",
        "metadata": "eA==",
        "addr": 1,
        "num_blocks": 8,
        "page_bytes": LAYOUT.page_bytes,
        "planes": LAYOUT.planes,
    }
    with pytest.raises(KvTransferError, match="not started"):
        await dst.read(desc, "t", [BlockRun(0, 0, 1)], memory)
    await dst.aclose()  # closing an unstarted transport is fine


SOURCE_PROCESS = """
import asyncio, json, sys, time
import numpy as np
from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.disagg.transport import Export, ExportTable, KvMemory, TransportContext
from dynamo_gateway.settings import Settings
from dynamo_gateway_nixl.factory import build_transport

async def main():
    layout = KvLayout.from_dict(json.loads(sys.argv[1]))
    memory = KvMemory.zeros(layout, 32)
    memory.array[...] = np.random.default_rng(7).integers(0, 256, memory.array.shape, np.uint8)
    exports = ExportTable()
    exports.add(Export("x1", (3, 4), 8, time.monotonic() + 60, lambda: print("released x1")))
    desc = await build_transport(TransportContext(Settings(), "srcproc", layout)).start(
        memory, exports
    )
    print(json.dumps(desc), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_read_across_processes_and_peer_killed() -> None:
    import json
    import subprocess
    import sys

    from dynamo_gateway_nixl.transport import NixlTransport

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SOURCE_PROCESS,
        json.dumps(LAYOUT.to_dict()),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    dst = _transport("dstproc", timeout_s=5.0)
    assert isinstance(dst, NixlTransport)
    memory = KvMemory.zeros(LAYOUT, 8)
    try:
        assert proc.stdout is not None
        # Only the descriptor on stdout: the plugin moves NIXL's logging off it.
        desc = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        await dst.start(memory, ExportTable())
        assert await dst.read(desc, "x1", [BlockRun(3, 1, 2)], memory) == 2 * LAYOUT.block_bytes
        expected = np.random.default_rng(7).integers(
            0, 256, (LAYOUT.planes, 32, LAYOUT.page_bytes), np.uint8
        )
        np.testing.assert_array_equal(memory.array[:, 1:3], expected[:, 3:5])
        assert not memory.array[:, [0, *range(3, 8)]].any()
        await dst.release(desc, "x1")
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.strip() == b"released x1"

        proc.kill()
        await proc.wait()
        with pytest.raises((KvTransferError, OSError)):
            await asyncio.wait_for(dst.read(desc, "x1", [BlockRun(3, 1, 2)], memory), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await dst.aclose()
