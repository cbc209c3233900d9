#!/usr/bin/env python3
"""Cairn's Python benchmark: save stall and restore time of a training state
(model weights plus Adam moments) against what a user would otherwise call,
on the same bytes, the same tmpfs, in one run.

PyTorch (a state dict of float32 tensors):
  * sync: ``torch.save`` / ``torch.load``; ``dcp.save`` with
    ``FileSystemWriter`` / ``dcp.load`` with ``FileSystemReader``;
  * async: ``dcp.async_save(FileSystemWriter)`` (and, where it runs, with
    ``cache_staged_state_dict=True``: pinned staging needs CUDA), the fastest
    being the framework's async baseline;
  * Cairn: ``Client.save_async`` (stall: until the bytes are staged in tmpfs),
    ``dcp.async_save(CairnWriter)`` (stall: the copy into the host buffers
    ``CairnWriter`` keeps per client; every save here passes the same
    client), ``dcp.save``/``dcp.load`` through
    ``CairnWriter``/``CairnReader``, and ``Client.restore`` (zero copy, and
    copied into the live tensors).
JAX (a pytree of jax arrays):
  * Orbax ``StandardCheckpointer``: ``save()`` returning (its async stall)
    and until ``wait_until_finished()``; restore;
  * Cairn: ``cairn.jax.save_async``, ``cairn.jax.save``, ``cairn.jax.restore``
    with a target.

For every async save it reports three times from the call: the *stall* (until
the trainer may go on and change its state), *until safe in RAM* (Cairn: the
step committed in the daemon's memory tier; a baseline: *until done*) and
*until on disk* (Cairn: durable in the disk tier, ``wait_durable(..., "disk")``).
Goals (issue 19): every Cairn stall <= 1.0x its framework's async stall and
every "until safe" <= 0.5x its framework's "until done", in the same run; the
output says plainly which goal is not met.

Run through ``./scripts/bench`` (which builds cairnd and sets CAIRND_BIN), or
``python benches/python_bench.py [--quick] [--mib N] [--repeat N]``. Prints
markdown tables with each Cairn time next to its baseline and the speedup
(baseline / Cairn); with ``CAIRN_BENCH_RECORD`` set, appends every figure as a
JSON line for ``benches/report.py``.
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
from dataclasses import dataclass
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


def phases(
    run: Callable[[], dict[str, float]], repeat: int, between: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median, per phase, of the seconds ``run`` reports over ``repeat`` runs."""
    runs = []
    for _ in range(repeat):
        runs.append(run())
        between()
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


@dataclass
class AsyncFigure:
    """An async save of Cairn against its framework's fastest async save."""

    framework: str
    case: str
    cairn: dict[str, float]  # stall, safe, disk
    baseline: str
    base: dict[str, float]  # stall, done

    @property
    def stall_ratio(self) -> float:
        return self.cairn["stall"] / self.base["stall"]

    @property
    def safe_ratio(self) -> float:
        return self.cairn["safe"] / self.base["done"]


STALL_GOAL = 1.0
SAFE_GOAL = 0.5
# Between async saves a "training step" adds 1 to one float32 in every MiB,
# so every chunk of the next save is new (nothing deduplicated on disk).
STRIDE = 1 << 18


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
    async_figures: list[AsyncFigure] = []
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

        def train_step() -> None:
            with torch.no_grad():
                for tensor in state.values():
                    tensor.view(-1)[::STRIDE] += 1

        # The framework's async save: the stall is DCP staging a CPU copy of
        # the state dict; the write to the directory runs in a thread.
        def dcp_async(writer_for: Callable[[], object]) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                shutil.rmtree(dcp_dir, ignore_errors=True)
                writer = writer_for()
                start = time.perf_counter()
                future = dcp.async_save(state, storage_writer=writer)
                stall = time.perf_counter() - start
                future.result()
                return {"stall": stall, "done": time.perf_counter() - start}

            return run

        # Each async save gets an untimed first run, as Cairn's saves do
        # (thread pools, first-call costs).
        torch_async: dict[str, dict[str, float]] = {}
        fresh_writer = dcp_async(lambda: dcp.FileSystemWriter(str(dcp_dir)))
        fresh_writer()
        torch_async["dcp.async_save(FileSystemWriter)"] = phases(fresh_writer, repeat)
        try:
            # Pinned, reused staging buffers: DCP's fastest async save, where
            # pinned memory exists (it needs CUDA).
            cached = dcp.FileSystemWriter(str(dcp_dir), cache_staged_state_dict=True)
            dcp_async(lambda: cached)()
            torch_async["dcp.async_save(FileSystemWriter, cached staging)"] = phases(
                dcp_async(lambda: cached), repeat
            )
        except RuntimeError as e:
            print(f"python-bench: dcp.async_save with cache_staged_state_dict=True "
                  f"skipped ({str(e).splitlines()[0][:80]})")  # fmt: skip
        shutil.rmtree(dcp_dir, ignore_errors=True)
        torch_baseline = min(torch_async, key=lambda name: torch_async[name]["stall"])

        # Steady state of a training job: the previous step has left the
        # memory tier (its files went to the page pool), so each save writes
        # over existing pages. Two untimed saves set that up.
        saved: list[int] = []

        def cairn_save_async() -> dict[str, float]:
            saved.append(next(step))
            start = time.perf_counter()
            handle = client.save_async("bench-torch", saved[-1], 0, state)
            handle.wait_staged()  # until then the trainer must not change its tensors
            stall = time.perf_counter() - start
            handle.result()
            safe = time.perf_counter() - start
            client.wait_durable("bench-torch", saved[-1], "disk")
            return {"stall": stall, "safe": safe, "disk": time.perf_counter() - start}

        def next_torch_step() -> None:
            if len(saved) > 1:
                drop(client, "bench-torch", saved[-2])
            train_step()

        for _ in range(2):  # the second one's drop frees the first step's files
            cairn_save_async()
            next_torch_step()
        save_async_phases = phases(cairn_save_async, repeat, next_torch_step)
        t_cairn_stall = save_async_phases["stall"]
        async_figures.append(AsyncFigure(
            "torch", "Client.save_async", save_async_phases, torch_baseline, torch_async[torch_baseline],
        ))  # fmt: skip

        def cairn_restore_zero_copy() -> None:
            restored = client.restore("bench-torch")
            assert len(restored) == len(state)

        t_cairn_zero_copy = timed(cairn_restore_zero_copy, repeat)

        def cairn_restore() -> None:
            restored = client.restore("bench-torch")
            for name, tensor in target.items():
                tensor.numpy()[...] = restored[name]

        t_cairn_restore = timed(cairn_restore, repeat)

        dcp_async_steps: list[int] = []

        def cairn_dcp_async() -> dict[str, float]:
            dcp_async_steps.append(next(step))
            writer = CairnWriter(job="bench-dcp-async", step=dcp_async_steps[-1], client=client)
            start = time.perf_counter()
            future = dcp.async_save(state, storage_writer=writer)
            stall = time.perf_counter() - start
            future.result()
            safe = time.perf_counter() - start
            client.wait_durable("bench-dcp-async", dcp_async_steps[-1], "disk")
            return {"stall": stall, "safe": safe, "disk": time.perf_counter() - start}

        def next_dcp_async_step() -> None:
            if len(dcp_async_steps) > 1:
                drop(client, "bench-dcp-async", dcp_async_steps[-2])
            train_step()

        for _ in range(2):
            cairn_dcp_async()
            next_dcp_async_step()
        async_figures.append(AsyncFigure(
            "torch", "dcp.async_save(CairnWriter)",
            phases(cairn_dcp_async, repeat, next_dcp_async_step),
            torch_baseline, torch_async[torch_baseline],
        ))  # fmt: skip

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

        def orbax_async() -> dict[str, float]:
            shutil.rmtree(orbax_dir, ignore_errors=True)
            start = time.perf_counter()
            checkpointer.save(orbax_dir / "ckpt", tree)  # returns once the arrays are on the host
            stall = time.perf_counter() - start
            checkpointer.wait_until_finished()
            return {"stall": stall, "done": time.perf_counter() - start}

        def jax_train_step() -> None:
            nonlocal tree
            tree = jax.block_until_ready({k: v.at[::STRIDE].add(1) for k, v in tree.items()})

        orbax_baseline = "orbax StandardCheckpointer.save()"
        orbax_async()
        orbax_phases = phases(orbax_async, repeat, jax_train_step)
        t_orbax_restore = timed(
            lambda: jax.block_until_ready(checkpointer.restore(orbax_dir / "ckpt", abstract)), repeat
        )
        shutil.rmtree(orbax_dir)
        jax_async_steps: list[int] = []

        def cjax_save_async() -> dict[str, float]:
            jax_async_steps.append(next(step))
            start = time.perf_counter()
            handle = cjax.save_async(client, "bench-jax-async", jax_async_steps[-1], tree)
            stall = time.perf_counter() - start
            handle.result()
            safe = time.perf_counter() - start
            handle.wait_durable("disk")
            return {"stall": stall, "safe": safe, "disk": time.perf_counter() - start}

        def next_jax_async_step() -> None:
            if len(jax_async_steps) > 1:
                drop(client, "bench-jax-async", jax_async_steps[-2])
            jax_train_step()

        for _ in range(2):
            cjax_save_async()
            next_jax_async_step()
        async_figures.append(AsyncFigure(
            "jax", "cairn.jax.save_async",
            phases(cjax_save_async, repeat, next_jax_async_step),
            orbax_baseline, orbax_phases,
        ))  # fmt: skip
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
            ("jax: save", "orbax StandardCheckpointer (until finished)", t_orbax_save, t_cjax_save),
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

    print()
    print("Async saves, seconds from the call (Cairn: stall, then safe in the daemon's RAM, then on disk;")
    print("baseline: the framework's fastest async save in this run, its stall and until done):")
    print()
    print(f"| framework | cairn | stall s | until safe in RAM s | until on disk s | baseline | stall s | until done s "
          f"| stall ratio (goal <= {STALL_GOAL}) | safe / done (goal <= {SAFE_GOAL}) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for f in async_figures:
        print(f"| {f.framework} | {f.case} | {f.cairn['stall']:.3f} | {f.cairn['safe']:.3f} | {f.cairn['disk']:.3f} "
              f"| {f.baseline} | {f.base['stall']:.3f} | {f.base['done']:.3f} "
              f"| {f.stall_ratio:.2f}x | {f.safe_ratio:.2f}x |")  # fmt: skip
    for name, figure in torch_async.items():
        if name != torch_baseline:
            print(f"(slower torch async baseline: {name}: stall {figure['stall']:.3f} s, done {figure['done']:.3f} s)")
    print()
    missed = []
    for f in async_figures:
        if f.stall_ratio > STALL_GOAL:
            missed.append(f"{f.framework}: {f.case} stalls {f.cairn['stall']:.3f} s, {f.stall_ratio:.2f}x "
                          f"{f.baseline}'s {f.base['stall']:.3f} s (goal <= {STALL_GOAL}x)")  # fmt: skip
        if f.safe_ratio > SAFE_GOAL:
            missed.append(f"{f.framework}: {f.case} is safe in RAM after {f.cairn['safe']:.3f} s, "
                          f"{f.safe_ratio:.2f}x {f.baseline}'s until done {f.base['done']:.3f} s "
                          f"(goal <= {SAFE_GOAL}x)")  # fmt: skip
    for line in missed:
        print(f"GOAL NOT MET: {line}")
    if not missed:
        print(f"All async goals met: every stall <= {STALL_GOAL}x and every until-safe <= {SAFE_GOAL}x "
              "its framework's async save in this run.")  # fmt: skip

    record = os.environ.get("CAIRN_BENCH_RECORD")
    if record:
        # JSON lines for benches/report.py (./scripts/bench --report).
        lines = []
        for case, baseline, t_base, t_cairn in rows:
            lines.append({
                "bench": "python-bench", "figure": case, "bytes": nbytes,
                "cairn_gbps": gb / t_cairn, "baseline_gbps": gb / t_base,
                "cairn_seconds": t_cairn, "baseline_seconds": t_base,
                "baseline": baseline, "ratio": t_base / t_cairn, "goal": "speed-up (report)",
            })  # fmt: skip
        for f in async_figures:
            # Every async line carries all five times; each line's own pair is
            # in cairn_seconds/baseline_seconds, its verdict in goal/goal_met.
            times = {
                "stall_seconds": f.cairn["stall"], "until_safe_seconds": f.cairn["safe"],
                "until_disk_seconds": f.cairn["disk"], "baseline_stall_seconds": f.base["stall"],
                "baseline_until_done_seconds": f.base["done"],
            }  # fmt: skip
            pairs = [
                ("async save stall", f"{f.baseline}: stall", f.cairn["stall"], f.base["stall"],
                 STALL_GOAL, f.stall_ratio),
                ("async save until safe in RAM", f"{f.baseline}: until done", f.cairn["safe"],
                 f.base["done"], SAFE_GOAL, f.safe_ratio),
                ("async save until on disk", f"{f.baseline}: until done", f.cairn["disk"],
                 f.base["done"], None, f.cairn["disk"] / f.base["done"]),
            ]  # fmt: skip
            for what, baseline, t_cairn, t_base, goal, time_ratio in pairs:
                met = None if goal is None else time_ratio <= goal
                verdict = "reported" if goal is None else (
                    f"time ratio <= {goal}: {'met' if met else 'NOT MET'} ({time_ratio:.2f})"
                )
                lines.append({
                    "bench": "python-bench", "figure": f"{f.framework}: {what} ({f.case})",
                    "bytes": nbytes, "cairn_gbps": gb / t_cairn, "baseline_gbps": gb / t_base,
                    "cairn_seconds": t_cairn, "baseline_seconds": t_base, "baseline": baseline,
                    "ratio": t_base / t_cairn, "time_ratio": time_ratio, "goal": verdict,
                    "goal_met": met, **times,
                })  # fmt: skip
        with open(record, "a") as out:
            for line in lines:
                out.write(json.dumps(line) + "\n")

    return 0


if __name__ == "__main__":
    sys.exit(main())
