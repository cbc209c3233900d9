#!/usr/bin/env python3
"""Cairn's Python benchmark: save stall and restore time of a training state
(model weights plus Adam moments) against what a user would otherwise call,
on the same bytes, the same tmpfs, in one run.

PyTorch (a state dict of float32 tensors):
  * ``torch.save`` / ``torch.load``;
  * ``dcp.save`` with ``FileSystemWriter`` / ``dcp.load`` with ``FileSystemReader``;
  * Cairn: ``Client.save_async`` until the bytes are staged in tmpfs (the
    trainer's stall) and ``Client.restore`` copied into the live tensors, and
    ``dcp.save``/``dcp.load`` through ``CairnWriter``/``CairnReader``.
JAX (a pytree of jax arrays):
  * Orbax ``StandardCheckpointer`` save (until finished) / restore;
  * Cairn: ``cairn.jax.save`` / ``cairn.jax.restore`` with a target.

Run through ``./scripts/bench`` (which builds cairnd and sets CAIRND_BIN), or
``python benches/python_bench.py [--quick] [--mib N]``. Prints a markdown table
with each Cairn time next to its baseline and the speedup (baseline / Cairn).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

warnings.filterwarnings("ignore")


def timed(fn: Callable[[], object], repeat: int, between: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, ``between`` after each."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        between()
    return statistics.median(times)


def drop(client: object, job: str, step: int) -> None:
    """Deletes a step unless retention already evicted it."""
    import cairn

    try:
        client.delete(job, step)  # type: ignore[attr-defined]
    except cairn.NotFound:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 runs")
    parser.add_argument("--mib", type=int, help="state size in MiB (default 2048)")
    parser.add_argument("--repeat", type=int, help="runs per figure (median reported)")
    args = parser.parse_args()
    mib = args.mib or (128 if args.quick else 2048)
    repeat = args.repeat or (2 if args.quick else 3)


    import torch
    import torch.distributed.checkpoint as dcp

    import cairn
    from cairn.torch import CairnReader, CairnWriter

    repo = Path(__file__).resolve().parents[1]
    binary = os.environ.get("CAIRND_BIN") or str(repo / "target" / "release" / "cairnd")
    work = Path(tempfile.mkdtemp(prefix="cairn-pybench-"))
    shm = Path(tempfile.mkdtemp(prefix="cairn-pybench-", dir="/dev/shm"))
    socket = str(work / "cairn.sock")
    daemon = subprocess.Popen(
        [binary, "--socket", socket, "--memory-dir", str(shm / "t0"), "--disk-dir", str(work / "t1"),
         "--metrics-addr", "off", "--memory-keep-last", "1", "--disk-keep-last", "1"],
        stdout=subprocess.DEVNULL, stderr=open(work / "cairnd.log", "wb"),
        env={k: v for k, v in os.environ.items() if not k.startswith("CAIRN")} | {"CAIRN_LOG": "warn"},
    )  # fmt: skip
    rows: list[tuple[str, str, float, float]] = []
    try:
        client = cairn.Client(socket)
        deadline = time.monotonic() + 30
        while not client.ping(timeout=1.0):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((work / "cairnd.log").read_text()[-2000:])
                return 1
            time.sleep(0.1)

        # ----- PyTorch: weights + Adam exp_avg + exp_avg_sq, 24 tensors -----
        per = mib * (1 << 20) // 24 // 4
        torch.manual_seed(0)
        state = {}
        for layer in range(8):
            w = torch.randn(per)
            state[f"model.layer{layer}.weight"] = w
            state[f"optim.layer{layer}.exp_avg"] = torch.randn(per)
            state[f"optim.layer{layer}.exp_avg_sq"] = torch.rand(per)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        print(f"python-bench: {nbytes / (1 << 20):.0f} MiB state ({len(state)} float32 tensors), "
              f"median of {repeat} runs, torch {torch.__version__}")  # fmt: skip
        step = iter(range(1, 1_000_000))

        pt = shm / "state.pt"
        t_save = timed(lambda: torch.save(state, pt), repeat)
        t_load = timed(lambda: torch.load(pt), repeat)
        pt.unlink()

        dcp_dir = shm / "dcp"
        t_dcp_save = timed(
            lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dcp_dir))),
            repeat, lambda: shutil.rmtree(dcp_dir, ignore_errors=True),
        )  # fmt: skip
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dcp_dir)))
        target = {k: torch.empty_like(v) for k, v in state.items()}
        t_dcp_load = timed(lambda: dcp.load(target, storage_reader=dcp.FileSystemReader(str(dcp_dir))), repeat)
        shutil.rmtree(dcp_dir)

        # Steady state of a training job: the previous step has left the
        # memory tier (its files went to the page pool), so each save writes
        # over existing pages. Two untimed saves set that up.
        saved: list[int] = []

        def cairn_stall() -> None:
            saved.append(next(step))
            handle = client.save_async("bench-torch", saved[-1], 0, state)
            handle.wait_staged()
            cairn_stall.handle = handle  # type: ignore[attr-defined]

        def finish_save() -> None:
            cairn_stall.handle.result()  # type: ignore[attr-defined]
            if len(saved) > 1:
                drop(client, "bench-torch", saved[-2])

        for _ in range(2):  # the second one's finish frees the first step's files
            cairn_stall()
            finish_save()
        t_cairn_stall = timed(cairn_stall, repeat, finish_save)

        def cairn_restore_zero_copy() -> None:
            restored = client.restore("bench-torch")
            assert len(restored) == len(state)

        t_cairn_zero_copy = timed(cairn_restore_zero_copy, repeat)

        def cairn_restore() -> None:
            restored = client.restore("bench-torch")
            for name, tensor in target.items():
                tensor.numpy()[...] = restored[name]

        t_cairn_restore = timed(cairn_restore, repeat)

        dcp_steps: list[int] = []

        def cairn_dcp_save() -> None:
            dcp_steps.append(next(step))
            dcp.save(state, storage_writer=CairnWriter(job="bench-dcp", step=dcp_steps[-1], client=client))

        def drop_previous_dcp_step() -> None:
            if len(dcp_steps) > 1:
                drop(client, "bench-dcp", dcp_steps[-2])

        for _ in range(2):
            cairn_dcp_save()
            drop_previous_dcp_step()
        t_cairn_dcp_save = timed(cairn_dcp_save, repeat, drop_previous_dcp_step)
        t_cairn_dcp_load = timed(
            lambda: dcp.load(target, storage_reader=CairnReader(job="bench-dcp", client=client)), repeat
        )
        for name, tensor in state.items():
            assert torch.equal(target[name], tensor), f"{name} differs after restore"

        rows += [
            ("torch: save stall", "torch.save", t_save, t_cairn_stall),
            ("torch: save stall", "dcp.save(FileSystemWriter)", t_dcp_save, t_cairn_stall),
            ("torch: restore, zero-copy arrays", "torch.load", t_load, t_cairn_zero_copy),
            ("torch: restore into live tensors", "torch.load", t_load, t_cairn_restore),
            ("torch: restore into live tensors", "dcp.load(FileSystemReader)", t_dcp_load, t_cairn_restore),
            ("dcp.save via CairnWriter", "dcp.save(FileSystemWriter)", t_dcp_save, t_cairn_dcp_save),
            ("dcp.load via CairnReader", "dcp.load(FileSystemReader)", t_dcp_load, t_cairn_dcp_load),
        ]
        del target

        # ----- JAX: the same bytes as a pytree, through Orbax and cairn.jax -----
        import jax
        import jax.numpy as jnp
        import orbax.checkpoint as ocp

        import cairn.jax as cjax

        tree = {name.replace(".", "_"): jnp.asarray(t.numpy()) for name, t in state.items()}
        jax.block_until_ready(tree)
        del state
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        checkpointer = ocp.StandardCheckpointer()
        orbax_dir = shm / "orbax"

        def orbax_save() -> None:
            shutil.rmtree(orbax_dir, ignore_errors=True)
            checkpointer.save(orbax_dir / "ckpt", tree)
            checkpointer.wait_until_finished()

        t_orbax_save = timed(orbax_save, repeat)
        t_orbax_restore = timed(
            lambda: jax.block_until_ready(checkpointer.restore(orbax_dir / "ckpt", abstract)), repeat
        )
        shutil.rmtree(orbax_dir)
        jax_steps: list[int] = []

        def cjax_save() -> None:
            jax_steps.append(next(step))
            cjax.save(client, "bench-jax", jax_steps[-1], tree)

        def drop_previous_jax_step() -> None:
            if len(jax_steps) > 1:
                drop(client, "bench-jax", jax_steps[-2])

        for _ in range(2):
            cjax_save()
            drop_previous_jax_step()
        t_cjax_save = timed(cjax_save, repeat, drop_previous_jax_step)
        t_cjax_restore = timed(
            lambda: jax.block_until_ready(cjax.restore(client, "bench-jax", target=abstract)), repeat
        )
        restored = cjax.restore(client, "bench-jax", target=abstract)
        for key in tree:
            assert bool(jnp.array_equal(restored[key], tree[key])), f"{key} differs after restore"
        rows += [
            ("jax: save", "orbax StandardCheckpointer", t_orbax_save, t_cjax_save),
            ("jax: restore", "orbax StandardCheckpointer", t_orbax_restore, t_cjax_restore),
        ]
        client.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    gb = nbytes / 1e9
    print()
    print("| case | baseline | baseline s | cairn s | cairn GB/s | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for case, baseline, t_base, t_cairn in rows:
        print(f"| {case} | {baseline} | {t_base:.3f} | {t_cairn:.3f} | {gb / t_cairn:.2f} | {t_base / t_cairn:.2f}x |")
    record = os.environ.get("CAIRN_BENCH_RECORD")
    if record:
        # JSON lines for benches/report.py (./scripts/bench --report).
        with open(record, "a") as f:
            for case, baseline, t_base, t_cairn in rows:
                f.write(json.dumps({
                    "bench": "python-bench", "figure": case, "bytes": nbytes,
                    "cairn_gbps": gb / t_cairn, "baseline_gbps": gb / t_base,
                    "cairn_seconds": t_cairn, "baseline_seconds": t_base,
                    "baseline": baseline, "ratio": t_base / t_cairn, "goal": "speed-up (report)",
                }) + "\n")

    return 0


if __name__ == "__main__":
    sys.exit(main())
