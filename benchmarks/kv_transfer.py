"""KV transport bandwidth and latency, beside memcpy and a raw loopback socket.

For each size (1 to 256 MiB of KV blocks of SmolLM2-135M's fp32 layout,
737,280 bytes per block) and each transport, a decode-side pool pulls one
contiguous run of blocks from a prefill-side pool. The source lives in another
process for `shm`, `tcp` and `nixl` (spawned, with an export over all its
blocks), in this process for `inprocess`. Baselines from the same run: a numpy
copy of the same bytes between two arrays (the ceiling), and a raw TCP
loopback socket moving the same bytes (`sendall` / `recv_into`, what `tcp` is
measured against). A fragmented case (every other block, so runs cannot merge)
shows the per-segment cost. Each point: the median of --reps reads.

    python benchmarks/kv_transfer.py --json benchmarks/results/kv_transfer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import Export, ExportTable, KvMemory, TransportContext
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.settings import load_settings

LAYOUT = KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float32")
MIB = 1 << 20
SIZES_MIB = (1, 4, 16, 64, 256)
POOL_BLOCKS = 2 * (256 * MIB // LAYOUT.block_bytes) + 8
SEED = 7


def blocks_for(mib: int) -> int:
    return max(1, round(mib * MIB / LAYOUT.block_bytes))


def fill(memory: KvMemory) -> None:
    rng = np.random.default_rng(SEED)
    memory.array[...] = rng.integers(0, 256, memory.array.shape, dtype=np.uint8)


def build(name: str, worker: str) -> Any:
    settings = load_settings(disagg={"kv_transfer_timeout_s": 3600.0})
    factory = load_plugins().registry.kv_transports.get(name)
    return factory(TransportContext(settings, worker, LAYOUT))


async def start_source(name: str) -> tuple[Any, KvMemory, dict[str, Any]]:
    transport = build(name, f"bench-src-{name}")
    array = transport.allocate(LAYOUT, POOL_BLOCKS)
    memory = KvMemory.zeros(LAYOUT, POOL_BLOCKS) if array is None else KvMemory(LAYOUT, array)
    fill(memory)
    exports = ExportTable()
    exports.add(
        Export(
            "bench",
            tuple(range(POOL_BLOCKS)),
            POOL_BLOCKS * 16,
            time.monotonic() + 3600,
            lambda: None,
        )
    )
    desc = await transport.start(memory, exports)
    return transport, memory, desc


def source_process(name: str, conn: Connection) -> None:
    async def main() -> None:
        transport, _, desc = await start_source(name)
        conn.send(desc)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        await transport.aclose()

    asyncio.run(main())


def raw_socket_sender(port_conn: Connection, nbytes_list: list[int], reps: int) -> None:
    payload = np.random.default_rng(SEED).integers(0, 256, max(nbytes_list), dtype=np.uint8)
    server = socket.create_server(("127.0.0.1", 0))
    port_conn.send(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(payload)
    for n in nbytes_list:
        for _ in range(reps):
            conn.recv(1)  # "go"
            conn.sendall(view[:n])
    conn.close()


def bench_raw_socket(nbytes_list: list[int], reps: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=raw_socket_sender, args=(child, nbytes_list, reps))
    proc.start()
    port = parent.recv()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.zeros(max(nbytes_list), np.uint8)
    out: dict[int, list[float]] = {}
    for n in nbytes_list:
        times = []
        for _ in range(reps):
            view = memoryview(buf)[:n]
            t0 = time.perf_counter()
            sock.sendall(b"g")
            got = 0
            while got < n:
                got += sock.recv_into(view[got:], n - got)
            times.append(time.perf_counter() - t0)
        out[n] = times
    sock.close()
    proc.join(10)
    return out


def bench_memcpy(nblocks: int, reps: int) -> list[float]:
    src = KvMemory.zeros(LAYOUT, nblocks)
    fill(src)
    dst = KvMemory.zeros(LAYOUT, nblocks)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst.array, src.array)
        times.append(time.perf_counter() - t0)
    return times


async def bench_transport(
    name: str, cases: list[tuple[str, list[BlockRun]]], reps: int
) -> dict[str, list[float]]:
    proc = None
    parent = None
    if name == "inprocess":
        src_transport, _, desc = await start_source(name)
    else:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=source_process, args=(name, child))
        proc.start()
        desc = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        src_transport = None
    reader = build(name, f"bench-dst-{name}")
    dst = KvMemory.zeros(LAYOUT, POOL_BLOCKS)
    local = await reader.start(dst, ExportTable())
    if not reader.can_connect(local, desc):
        raise RuntimeError(f"{name}: cannot connect to its own source")
    expected = KvMemory.zeros(LAYOUT, POOL_BLOCKS)
    fill(expected)
    out: dict[str, list[float]] = {}
    try:
        for label, runs in cases:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                await reader.read(desc, "bench", runs, dst)
                times.append(time.perf_counter() - t0)
            out[label] = times
            for run in runs:  # the bytes arrived intact
                got = dst.array[:, run.dst : run.dst + run.length]
                want = expected.array[:, run.src : run.src + run.length]
                if not np.array_equal(got, want):
                    raise AssertionError(f"{name} {label}: bytes differ")
    finally:
        await reader.aclose()
        if src_transport is not None:
            await src_transport.aclose()
        if parent is not None and proc is not None:
            parent.send("stop")
            proc.join(20)
    return out


def summarize(times: list[float], nbytes: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"ms": med * 1e3, "gb_s": nbytes / med / 1e9, "min_ms": min(times) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--transports", default="inprocess,shm,tcp,nixl")
    p.add_argument("--json", dest="json_path", help="write results here")
    args = p.parse_args()
    names = [n for n in args.transports.split(",") if n]
    registry = load_plugins().registry.kv_transports
    names = [n for n in names if n in registry]
    sizes = [(mib, blocks_for(mib)) for mib in SIZES_MIB]
    frag_blocks = blocks_for(64)
    cases: list[tuple[str, list[BlockRun]]] = [
        (f"{mib} MiB", [BlockRun(0, 0, n)]) for mib, n in sizes
    ]
    cases.append(("64 MiB fragmented", [BlockRun(2 * i, i, 1) for i in range(frag_blocks)]))
    nbytes = {label: sum(r.length for r in runs) * LAYOUT.block_bytes for label, runs in cases}

    results: dict[str, Any] = {
        "layout": LAYOUT.to_dict(),
        "block_bytes": LAYOUT.block_bytes,
        "reps": args.reps,
        "bytes": nbytes,
        "series": {},
    }
    print("memcpy ...", file=sys.stderr, flush=True)
    results["series"]["memcpy"] = {
        f"{mib} MiB": summarize(bench_memcpy(n, args.reps), n * LAYOUT.block_bytes)
        for mib, n in sizes
    }
    print("raw loopback socket ...", file=sys.stderr, flush=True)
    raw = bench_raw_socket([n * LAYOUT.block_bytes for _, n in sizes], args.reps)
    results["series"]["raw_socket"] = {
        f"{mib} MiB": summarize(raw[n * LAYOUT.block_bytes], n * LAYOUT.block_bytes)
        for mib, n in sizes
    }
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            times = asyncio.run(bench_transport(name, cases, args.reps))
        except Exception as exc:  # a transport that cannot run here is reported, not fatal
            print(f"  {name} failed: {exc!r}", file=sys.stderr)
            results["series"][name] = {"error": repr(exc)}
            continue
        results["series"][name] = {label: summarize(t, nbytes[label]) for label, t in times.items()}

    labels = [label for label, _ in cases]
    series = results["series"]
    head = f"{'GB/s (median)':<18}" + "".join(f"{label:>20}" for label in labels)
    print(head)
    for name, rows in series.items():
        if "error" in rows:
            print(f"{name:<18}{rows['error']}")
            continue
        cells = []
        for label in labels:
            row = rows.get(label)
            if row is None:
                cells.append(f"{'-':>20}")
                continue
            base = series["memcpy"].get(label) or series["memcpy"]["64 MiB"]
            ratio = row["gb_s"] / base["gb_s"]
            cells.append(f"{row['gb_s']:>8.2f} ({ratio:>4.2f}x mc)")
        print(f"{name:<18}" + "".join(f"{c:>20}" for c in cells))
    print("\nlatency ms (median):")
    for name, rows in series.items():
        if "error" not in rows:
            print(
                f"{name:<18}"
                + "".join(f"{rows[c]['ms']:>20.2f}" if c in rows else f"{'-':>20}" for c in labels)
            )
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
