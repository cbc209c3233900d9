"""A training job's checkpoints across a crash, as a torchtitan-style loop does them.

Two gloo ranks train a tiny model sharded with FSDP2 (``fully_shard``) on
CPU and save through ``dcp.save(CairnWriter)``. One rank dies (SIGKILL)
while writing a step; the restarted job resumes from ``latest``, trains and
saves that step again with default arguments, which must just work: the
crashed save's shards are replaced by the new attempt's. Also: a zombie of
the old attempt can never commit into the new one's step.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import torch.distributed as dist  # noqa: E402

import cairn  # noqa: E402
from cairn._proto.cairn.v1 import cairn_pb2 as pb  # noqa: E402
from cairn.torch import CairnReader, CairnWriter  # noqa: E402
from conftest import Daemon, free_port  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

#: Steps trained before the first checkpoint; the crash happens saving N + 1.
N = 2
WORLD = 2


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)
    )


def _train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int, rank: int) -> None:
    data = torch.Generator().manual_seed(1000 * step + rank)
    model(torch.randn(4, 16, generator=data)).square().mean().backward()
    optim.step()
    optim.zero_grad()


def _rank_main(rank: int, port: int, socket: str, job: str, phase: str, out: str) -> None:
    """One rank of the job: ``phase`` "crash" (first run) or "resume" (after it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model(seed=1 if phase == "crash" else 99)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=CairnWriter(job=job, step=step, socket=socket),
        )
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            torch.save(full, os.path.join(out, f"{phase}-{step}.pt"))

    if phase == "crash":
        for step in range(1, N + 1):
            _train_step(model, optim, step, rank)
        checkpoint(N)
        _train_step(model, optim, N + 1, rank)
        if rank == 1:
            # Rank 1 stops in the middle of its shard's bytes, where the test
            # kills it once rank 0's shard of N + 1 is committed.
            real = os.pwrite

            def pwrite(fd: int, data: object, offset: int) -> int:
                written = real(fd, data, offset)  # type: ignore[arg-type]
                Path(out, "rank1-writing").touch()
                time.sleep(3600)
                return written

            os.pwrite = pwrite  # type: ignore[assignment]
        try:
            checkpoint(N + 1)
        except BaseException:  # noqa: BLE001 - rank 0 loses its peer: die quietly
            os._exit(3)
        raise AssertionError("the save of step N + 1 should never finish")

    # Resume from latest, as the restarted job does.
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    reader = CairnReader(job=job, socket=socket)
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # Gathering the full state dict is a collective: every rank takes part.
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        Path(out, "resumed-from").write_text(str(reader.resolved_step))
        torch.save(full, os.path.join(out, f"loaded-{reader.resolved_step}.pt"))
    assert reader.resolved_step is not None
    _train_step(model, optim, reader.resolved_step + 1, rank)
    checkpoint(reader.resolved_step + 1)  # default arguments: no overwrite
    # Both ranks leave together, then skip interpreter finalisation: gloo's
    # worker threads can abort the process there ("terminate called without
    # an active exception", SIGABRT) when its peer is already gone, which is
    # torch's teardown, not the checkpoint. Everything the test checks is
    # written by now.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(phase: str, port: int, daemon: Daemon, job: str, out: Path) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(rank, port, daemon.socket, job, phase, str(out)))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    return procs


def _assert_same_tensors(loaded: dict, expected: dict) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


def test_rank_killed_mid_save_then_the_restarted_job_saves_that_step_again(
    daemon: Daemon, job: str, tmp_path: Path
) -> None:
    procs = _spawn("crash", free_port(), daemon, job, tmp_path)
    try:
        with daemon.client() as c:
            # Kill rank 1 once DCP rank 0's shard of N + 1 (Cairn rank 1) is
            # committed and rank 1 is inside its write.
            deadline = time.monotonic() + 120
            while True:
                assert time.monotonic() < deadline, "rank 0's shard of N + 1 never committed"
                assert all(p.exitcode is None for p in procs), [p.exitcode for p in procs]
                steps = {s.step: s for s in c.list_steps(job)}
                if (
                    N + 1 in steps
                    and 1 in {s.rank for s in steps[N + 1].shards}
                    and (tmp_path / "rank1-writing").exists()
                ):
                    break
                time.sleep(0.05)
            os.kill(procs[1].pid, signal.SIGKILL)
            # The launcher tears the rest of the job down.
            procs[1].join()
            procs[0].kill()
            procs[0].join()
            steps = {s.step: s for s in c.list_steps(job)}
            assert steps[N].restorable and not steps[N + 1].restorable
            crashed_attempt = {s.rank: s.attempt for s in steps[N + 1].shards}[1]
            assert c.latest_step(job) == N
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()

    procs = _spawn("resume", free_port(), daemon, job, tmp_path)
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    assert (tmp_path / "resumed-from").read_text() == str(N)
    _assert_same_tensors(
        torch.load(tmp_path / f"loaded-{N}.pt"), torch.load(tmp_path / f"crash-{N}.pt")
    )

    with daemon.client() as c:
        steps = {s.step: s for s in c.list_steps(job)}
        assert steps[N + 1].restorable and c.latest_step(job) == N + 1
        attempts = {s.rank: s.attempt for s in steps[N + 1].shards}
        assert sorted(attempts) == [0, 1, 2]
        assert len(set(attempts.values())) == 1 and crashed_attempt not in attempts.values()

        # Loading N + 1 into a fresh (unsharded) model gives exactly the saved tensors.
        fresh = make_model(seed=7)
        loaded = {"model": fresh.state_dict()}
        dcp.load(loaded, storage_reader=CairnReader(job=job, step=N + 1, client=c))
        saved = torch.load(tmp_path / f"resume-{N + 1}.pt")
        _assert_same_tensors(loaded["model"], saved)
        _assert_same_tensors(fresh.state_dict(), saved)

        # A complete step stays immutable; overwrite=True replaces it.
        other = {"model": make_model(seed=8).state_dict()}
        with pytest.raises(BaseException, match="already exists"):  # DCP wraps it
            dcp.save(other, storage_writer=CairnWriter(job=job, step=N + 1, client=c))
        dcp.save(other, storage_writer=CairnWriter(job=job, step=N + 1, client=c, overwrite=True))
        replaced = {"model": make_model(seed=9).state_dict()}
        dcp.load(replaced, storage_reader=CairnReader(job=job, step=N + 1, client=c))
        _assert_same_tensors(replaced["model"], other["model"])


def test_zombie_of_an_old_attempt_never_commits_into_the_new_one(
    client: cairn.Client, job: str
) -> None:
    step = 7
    stub = client._stubs.checkpoint
    zombie_bytes = np.full(16, 13, dtype=np.uint8)
    # Attempt A (the crashed run) has begun rank 1 and is still writing.
    begun = stub.BeginShard(
        pb.BeginShardRequest(
            shard=client._ref(job, step, 1),
            files=[pb.FileSpec(name="a", size=16, metadata={"dtype": "uint8", "shape": "[16]"})],
            world_size=2,
            metadata={"cairn.format": "tensors/v1"},
            attempt="attempt-a",
        ),
        timeout=30,
    )
    with open(begun.files[0].path, "r+b") as f:
        f.write(zombie_bytes.tobytes())

    # Attempt B (the restarted run) saves every rank of the step.
    new = {0: np.arange(16, dtype=np.uint8), 1: np.arange(16, 32, dtype=np.uint8)}
    for rank, array in new.items():
        client.save(job, step, rank, {"a": array}, world_size=2, attempt="attempt-b")
    [listed] = client.list_steps(job)
    assert listed.restorable

    # A commits late: refused, and A cannot begin again either.
    with pytest.raises(grpc.RpcError) as late:
        stub.CommitShard(pb.CommitShardRequest(session_id=begun.session_id), timeout=30)
    assert late.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(cairn.Aborted, match="superseded"):
        client.save(job, step, 1, {"a": zombie_bytes}, world_size=2, attempt="attempt-a")

    # The step is still B's, byte for byte.
    [listed] = client.list_steps(job)
    assert listed.restorable and {s.attempt for s in listed.shards} == {"attempt-b"}
    for rank, array in new.items():
        restored = client.restore(job, step, rank)["a"]
        assert restored.tobytes() == array.tobytes()


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Cairn runs on Linux", allow_module_level=True)
