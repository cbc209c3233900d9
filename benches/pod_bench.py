#!/usr/bin/env python3
"""Cairn in a pod: save stall and restore of one training state through a
CSI volume's own socket, from a separate mount namespace, against the same
run's bare-host fast path and the streaming path a pod had before.

Three trainers, one after another, against one cairnd:

* ``host``: on the host, through the host socket (the fast path: files in
  the memory tier, written with ``pwrite`` and mapped on restore);
* ``pod``: a process in its own mount namespace (``unshare --mount``) as an
  unprivileged user, that sees only the volume at its mount path (the host
  socket's directory and the memory tier are hidden under empty tmpfs
  mounts) and finds cairnd through ``CAIRN_VOLUME``: files staged and
  restored inside the volume;
* ``pod, streaming``: the same pod forced onto ``transport="stream"``
  (``WriteShard``/``ReadShard``), what a pod got before volume sockets.

Each trainer saves the state with ``Client.save_async`` (the *stall*: until
the bytes are staged and the trainer may change its tensors; *until safe*:
committed in the daemon's memory tier) and restores it into preallocated
arrays (every byte read). Times are medians; CPU is the trainer's own plus
cairnd's (``/proc/<pid>/stat``) over everything the trainer did, per GiB it
moved. Goal (issue 14): in-pod stall and restore within 1.1x the host's.

Needs root (mount namespaces, the host socket); prints why and exits 0
without it. ``python benches/pod_bench.py [--quick] [--mib N] [--repeat N]``,
or through ``./scripts/bench``. With ``CAIRN_BENCH_RECORD`` set, appends
every figure as a JSON line for ``benches/report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

#: Unprivileged user the pod's trainer runs as.
POD_UID = 65534
GOAL = 1.1

TRAINER = textwrap.dedent(
    """
    import json, os, resource, statistics, sys, time
    import numpy as np
    import cairn

    mib, repeat, job, transport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    first = int(sys.argv[5])  # steps only ever go up in a job (retention keeps the newest)
    socket = sys.argv[6] if len(sys.argv) > 6 else None
    rng = np.random.default_rng(0)
    per = mib * (1 << 20) // 24 // 4
    state = {f"t{i}": rng.standard_normal(per, dtype=np.float32) for i in range(24)}
    target = {k: np.empty_like(v) for k, v in state.items()}
    nbytes = sum(v.nbytes for v in state.values())
    moved = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with cairn.Client(socket, transport=transport) as c:
        stalls, safes, restores = [], [], []
        for step in range(first, first + repeat + 2):
            start = time.perf_counter()
            handle = c.save_async(job, step, 0, state)
            handle.wait_staged()
            stall = time.perf_counter() - start
            handle.result()
            safe = time.perf_counter() - start
            start = time.perf_counter()
            restored = c.restore(job, step)
            for name, array in target.items():
                array[...] = restored[name]
            restore = time.perf_counter() - start
            moved += 2 * nbytes
            assert all(np.array_equal(target[k], state[k]) for k in state)
            if step > first:
                try:
                    c.delete(job, step - 1)
                except cairn.NotFound:
                    pass  # retention got there first
            for array in state.values():
                array[:: 1 << 18] += 1  # a training step: every chunk changes
            if step >= first + 2:  # two warm-up saves: the steady state of a job
                stalls.append(stall); safes.append(safe); restores.append(restore)
        streamed = restored.streamed
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({
        "bytes": nbytes, "moved": moved, "cpu": cpu, "streamed": streamed,
        "stall": statistics.median(stalls), "safe": statistics.median(safes),
        "restore": statistics.median(restores),
    }))
    """
)


def daemon_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 runs")
    parser.add_argument("--mib", type=int, help="state size in MiB (default 2048)")
    parser.add_argument("--repeat", type=int, help="runs per figure (median reported)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        print("pod-bench: skipped: needs root, unshare and setpriv (mount namespaces)")
        return 0
    mib = args.mib or (128 if args.quick else 2048)
    repeat = args.repeat or (2 if args.quick else 3)

    import grpc  # noqa: F401 - the client's dependency, present with it

    from cairn._proto.cairn.v1 import cairn_pb2 as pb
    from cairn._proto.cairn.v1 import cairn_pb2_grpc as pb_grpc

    repo = Path(__file__).resolve().parents[1]
    binary = os.environ.get("CAIRND_BIN") or str(repo / "target" / "release" / "cairnd")
    work = Path(tempfile.mkdtemp(prefix="cairn-podbench-"))
    shm = Path(tempfile.mkdtemp(prefix="cairn-podbench-", dir="/dev/shm"))
    pod_root = Path(tempfile.mkdtemp(prefix="cairn-pod-"))
    pod_root.chmod(0o755)
    socket = str(work / "cairn.sock")
    memory = shm / "t0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN")}
    daemon = subprocess.Popen(
        [binary, "--socket", socket, "--memory-dir", str(memory), "--disk-dir", str(work / "t1"),
         "--metrics-addr", "off", "--memory-keep-last", "1", "--disk-keep-last", "1"],
        stdout=subprocess.DEVNULL, stderr=open(work / "cairnd.log", "wb"), env=env | {"CAIRN_LOG": os.environ.get("CAIRN_LOG", "warn")},
    )  # fmt: skip
    results: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((work / "cairnd.log").read_text()[-2000:])
                return 1
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"unix:{socket}", options=[("grpc.default_authority", "localhost")])
        admin = pb_grpc.AdminStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)

        # The pod's volume, laid out and bound as cairn-csi does it.
        job = "bench-pod"
        volume = memory / "volumes" / "csi-bench"
        data = volume / "data"
        data.mkdir(parents=True)
        data.chmod(0o777)  # what the pod's fsGroup gives it
        (volume / "volume.json").write_text(json.dumps({
            "format": 1, "volume_id": "csi-bench", "tenant": "bench", "job": job, "rank": 0,
            "restore": "none", "target_path": "/x", "pod": {"namespace": "bench"},
        }))  # fmt: skip
        admin.BindVolume(pb.BindVolumeRequest(volume_id="csi-bench"), timeout=30)
        # The pod's user: uid 65534 when it can run this interpreter (a
        # checkout readable by others), else root without capabilities.
        drop = ["setpriv", "--reuid", str(POD_UID), "--regid", str(POD_UID), "--clear-groups"]
        probe = subprocess.run([*drop, sys.executable, "-c", "import cairn"], capture_output=True, cwd="/")
        if probe.returncode != 0:
            print(f"pod-bench: uid {POD_UID} cannot run {sys.executable}; the pod runs as root without capabilities")
            drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
        script = pod_root / "trainer.py"
        script.write_text(TRAINER)
        script.chmod(0o644)
        mount = pod_root / "mnt"
        mount.mkdir()

        def run(name: str, transport: str, in_pod: bool, first: int) -> None:
            base = [str(mib), str(repeat), job if in_pod else f"{job}-host", transport, str(first)]
            if in_pod:
                inner = " && ".join([
                    f"mount --bind {data} {mount}",
                    f"mount -t tmpfs -o size=1m none {work}",
                    f"mount -t tmpfs -o size=1m none {shm}",
                    f"exec {' '.join(drop)} {sys.executable} {script} " + " ".join(base),
                ])  # fmt: skip
                command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
                run_env = env | {"CAIRN_VOLUME": str(mount), "HOME": str(pod_root)}
            else:
                command = [sys.executable, str(script), *base, socket]
                run_env = env
            before = daemon_cpu(daemon.pid)
            done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=3600)
            if done.returncode != 0:
                log = (work / "cairnd.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}\ncairnd's log:\n{log}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures["daemon_cpu"] = daemon_cpu(daemon.pid) - before
            results[name] = figures

        run("host", "auto", in_pod=False, first=1)
        run("pod", "auto", in_pod=True, first=1)
        run("pod, streaming", "stream", in_pod=True, first=1000)
        channel.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        for path in (work, shm, pod_root):
            shutil.rmtree(path, ignore_errors=True)

    host = results["host"]
    gib = host["bytes"] / (1 << 30)
    print(f"pod-bench: {host['bytes'] / (1 << 20):.0f} MiB state (24 float32 arrays), median of {repeat} runs")
    print()
    print("| trainer | path | stall s | until safe s | restore s | restore GB/s | CPU s/GiB | stall / host | restore / host |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        cpu_per_gib = (r["cpu"] + r["daemon_cpu"]) / (r["moved"] / (1 << 30))
        path = "streamed" if r["streamed"] else "files"
        print(f"| {name} | {path} | {r['stall']:.3f} | {r['safe']:.3f} | {r['restore']:.3f} "
              f"| {r['bytes'] / 1e9 / r['restore']:.2f} | {cpu_per_gib:.2f} "
              f"| {r['stall'] / host['stall']:.2f}x | {r['restore'] / host['restore']:.2f}x |")  # fmt: skip
    pod = results["pod"]
    missed = [
        f"in-pod {what} {pod[what]:.3f} s is {pod[what] / host[what]:.2f}x the host's {host[what]:.3f} s"
        for what in ("stall", "restore")
        if pod[what] / host[what] > GOAL
    ]
    print()
    for line in missed:
        print(f"GOAL NOT MET (<= {GOAL}x): {line}")
    if not missed:
        print(f"In-pod stall and restore within {GOAL}x of the bare host's in this run.")

    record = os.environ.get("CAIRN_BENCH_RECORD")
    if record:
        with open(record, "a") as out:
            for name in ("pod", "pod, streaming"):
                r = results[name]
                for what, label in (("stall", "save stall"), ("restore", "restore into arrays")):
                    out.write(json.dumps({
                        "bench": "pod-bench", "figure": f"{name}: {label}", "bytes": r["bytes"],
                        "cairn_gbps": r["bytes"] / 1e9 / r[what], "baseline_gbps": host["bytes"] / 1e9 / host[what],
                        "cairn_seconds": r[what], "baseline_seconds": host[what], "baseline": f"host: {label}",
                        "ratio": host[what] / r[what],
                        "cpu_seconds_per_gib": (r["cpu"] + r["daemon_cpu"]) / (r["moved"] / (1 << 30)),
                        "goal": f"time ratio <= {GOAL}" if name == "pod" else "reported",
                        "goal_met": (r[what] / host[what] <= GOAL) if name == "pod" else None,
                    }) + "\n")  # fmt: skip
    del gib
    return 0


if __name__ == "__main__":
    sys.exit(main())
