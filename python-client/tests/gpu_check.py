#!/usr/bin/env python3
"""Checks the CUDA paths of the Python client on a machine with a GPU.

Starts a cairnd, saves CUDA tensors through ``cairn.Client`` (pinned host
staging) and through ``cairn.torch.CairnWriter`` with ``dcp.save``, restores
both back onto the GPU, checks every byte, and prints save and restore
throughput next to ``torch.save``/``torch.load`` of the same tensors on the
same tmpfs. Exits 0 with a SKIP line when torch or CUDA is missing, 1 when a
check fails.

    CAIRND_BIN=target/debug/cairnd python3 python-client/tests/gpu_check.py [--mib 1024]

Not collected by pytest (its name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--tensors", type=int, default=16, help="number of tensors (default 16)")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), or cpu to dry-run the script itself"
    )
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0

    import torch.distributed.checkpoint as dcp

    import cairn
    from cairn.torch import CairnReader, CairnWriter

    repo = Path(__file__).resolve().parents[2]
    binary = os.environ.get("CAIRND_BIN") or str(repo / "target" / "debug" / "cairnd")
    workdir = Path(tempfile.mkdtemp(prefix="cairn-gpu-"))
    memory_dir = f"/dev/shm/cairn-gpu-{uuid.uuid4().hex[:8]}"
    socket = str(workdir / "cairn.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN")}
    daemon = subprocess.Popen(
        [binary, "--socket", socket, "--memory-dir", memory_dir,
         "--disk-dir", str(workdir / "disk"), "--metrics-addr", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "cairnd.log", "wb"), env=env,
    )  # fmt: skip
    failures: list[str] = []
    try:
        client = cairn.Client(socket)
        deadline = time.monotonic() + 30
        while not client.ping(timeout=1.0):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((workdir / "cairnd.log").read_text()[-2000:])
                print("FAIL: cairnd did not start")
                return 1
            time.sleep(0.1)

        device = torch.device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"device: {name}, torch {torch.__version__}")

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        per_tensor = args.mib * (1 << 20) // args.tensors
        torch.manual_seed(0)
        state = {}
        for i in range(args.tensors):
            dtype = torch.bfloat16 if i % 2 == 0 else torch.float32
            numel = per_tensor // dtype.itemsize
            state[f"layer{i}.weight"] = torch.randn(numel, dtype=dtype, device=device)
        state["strided"] = torch.randn(64, 32, device=device).t()
        state["scalar"] = torch.tensor(7, device=device)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        gb = nbytes / 1e9
        sync()
        print(f"state: {len(state)} {device.type} tensors, {nbytes / (1 << 20):.0f} MiB")

        rows: list[tuple[str, float, float]] = []

        # Plain client: CUDA -> pinned host -> pwrite into tmpfs.
        for attempt in range(2):
            job = f"gpu-plain-{attempt}"
            start = time.perf_counter()
            client.save(job, 1, 0, state)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            restored = client.restore(job, 1)
            on_gpu = {
                k: torch.from_numpy(restored[k].reshape(-1).view("uint8").copy())
                .to(device)
                .view(state[k].dtype)
                .reshape(state[k].shape)
                for k in state
            }
            sync()
            restore_s = time.perf_counter() - start
            for k, v in state.items():
                if not torch.equal(on_gpu[k], v):
                    failures.append(f"Client round trip changed {k}")
            rows.append((f"cairn Client.save/restore (run {attempt + 1})", save_s, restore_s))
            del on_gpu, restored

        # DCP through CairnWriter/CairnReader.
        for attempt in range(2):
            job = f"gpu-dcp-{attempt}"
            start = time.perf_counter()
            dcp.save(state, storage_writer=CairnWriter(job=job, step=1, client=client))
            save_s = time.perf_counter() - start
            target = {k: torch.zeros_like(v) for k, v in state.items()}
            start = time.perf_counter()
            dcp.load(target, storage_reader=CairnReader(job=job, client=client))
            sync()
            restore_s = time.perf_counter() - start
            for k, v in state.items():
                if not torch.equal(target[k], v):
                    failures.append(f"DCP round trip changed {k}")
            rows.append((f"cairn dcp.save/load (run {attempt + 1})", save_s, restore_s))
            del target

        # Baseline: torch.save / torch.load on the same tmpfs.
        for attempt in range(2):
            path = f"{memory_dir}-torch-{attempt}.pt"
            start = time.perf_counter()
            torch.save(state, path)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            loaded = torch.load(path, map_location=device)
            sync()
            restore_s = time.perf_counter() - start
            os.unlink(path)
            for k, v in state.items():
                if not torch.equal(loaded[k], v):
                    failures.append(f"torch.save round trip changed {k}")
            rows.append((f"torch.save/load (run {attempt + 1})", save_s, restore_s))
            del loaded

        print(f"\n{'path':<42} {'save s':>8} {'GB/s':>6} {'restore s':>10} {'GB/s':>6}")
        for name, save_s, restore_s in rows:
            print(f"{name:<42} {save_s:8.3f} {gb / save_s:6.2f} {restore_s:10.3f} {gb / restore_s:6.2f}")
        client.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(memory_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    if failures:
        for failure in failures:
            print(f"FAIL: {failure}")
        return 1
    print("\nOK: CUDA tensors round-trip byte for byte through Client and DCP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
