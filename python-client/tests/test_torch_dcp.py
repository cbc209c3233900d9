"""cairn.torch with torch.distributed.checkpoint: one process, two gloo ranks."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import cairn  # noqa: E402
from cairn.torch import CairnReader, CairnWriter, parse_checkpoint_id  # noqa: E402
from conftest import Daemon, free_port  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning"
)


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)
    ).to(dtype)


def trained(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed, dtype)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 16, dtype=dtype)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def state(model: torch.nn.Module, optim: torch.optim.Optimizer, epoch: int) -> dict:
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "extra": {"epoch": epoch, "note": "hello", "mask": torch.tensor([True, False])},
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }


def assert_state_equal(a: object, b: object, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.cpu(), b.cpu()) or (a.numel() == 0), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path  # type: ignore[arg-type]
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")  # type: ignore[index]
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b)):  # type: ignore[call-overload]
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_model_and_adam_round_trip(client: cairn.Client, job: str, dtype: torch.dtype) -> None:
    model, optim = trained(1, dtype)
    saved = state(model, optim, epoch=3)
    dcp.save(saved, storage_writer=CairnWriter(job=job, step=100, client=client))

    steps = client.list_steps(job)
    assert [(s.step, s.restorable, len(s.shards)) for s in steps] == [(100, True, 2)]

    other_model, other_optim = trained(2, dtype)
    loaded = state(other_model, other_optim, epoch=0)
    loaded["extra"]["note"] = ""
    dcp.load(loaded, storage_reader=CairnReader(job=job, client=client))
    assert_state_equal(saved, loaded)
    # The modules themselves hold the loaded values.
    for (name, p), q in zip(model.named_parameters(), other_model.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_ids_and_latest(daemon: Daemon, job: str) -> None:
    model, optim = trained(3)
    with daemon.client() as c:
        for step in (1, 2):
            sd = state(model, optim, epoch=step)
            dcp.save(sd, checkpoint_id=f"cairn://{job}/{step}", storage_writer=CairnWriter(client=c))
        assert c.latest_step(job) == 2
    reader = CairnReader(socket=daemon.socket)
    loaded = state(*trained(4), epoch=0)
    dcp.load(loaded, checkpoint_id=f"cairn://{job}/latest", storage_reader=reader)
    assert loaded["extra"]["epoch"] == 2 and reader.resolved_step == 2
    dcp.load(loaded, checkpoint_id=f"cairn://{job}/1", storage_reader=reader)
    assert loaded["extra"]["epoch"] == 1

    assert parse_checkpoint_id("cairn://t/j/7") == ("t", "j", "7")
    assert CairnWriter.validate_checkpoint_id("cairn://j/3")
    assert not CairnWriter.validate_checkpoint_id("/tmp/ckpt")
    assert not CairnReader.validate_checkpoint_id("cairn://only-job")


def test_steps_are_immutable_unless_overwrite(client: cairn.Client, job: str) -> None:
    model, optim = trained(5)
    dcp.save(state(model, optim, 1), storage_writer=CairnWriter(job=job, step=1, client=client))
    first = {s.rank: s.attempt for s in client.list_steps(job)[0].shards}
    # One attempt per save, shared by every shard (the metadata one included).
    assert len(set(first.values())) == 1 and first[0]
    with pytest.raises(BaseException, match="already exists"):  # DCP wraps it
        dcp.save(state(model, optim, 2), storage_writer=CairnWriter(job=job, step=1, client=client))
    assert {s.rank: s.attempt for s in client.list_steps(job)[0].shards} == first
    dcp.save(
        state(model, optim, 2),
        storage_writer=CairnWriter(job=job, step=1, client=client, overwrite=True),
    )
    loaded = state(model, optim, 0)
    dcp.load(loaded, storage_reader=CairnReader(job=job, step=1, client=client))
    assert loaded["extra"]["epoch"] == 2


def test_async_save(client: cairn.Client, job: str) -> None:
    model, optim = trained(6)
    saved = state(model, optim, epoch=9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    response = dcp.async_save(saved, storage_writer=CairnWriter(job=job, step=7, client=client))
    future = getattr(response, "upload_completion", response)
    # The state dict was staged: the trainer may change its tensors now.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    future.result()
    assert client.latest_step(job) == 7
    loaded = state(*trained(7), epoch=0)
    dcp.load(loaded, storage_reader=CairnReader(job=job, client=client))
    for k, v in expected.items():
        assert torch.equal(loaded["model"][k], v), k
    assert loaded["extra"]["epoch"] == 9


def _staged_ptrs(client: cairn.Client) -> dict[str, int]:
    """data_ptr of every tensor in the host buffers kept for ``client``."""
    from cairn import torch as ctorch

    host = ctorch._buffers[client]._host
    assert host is not None
    return {k: v.data_ptr() for k, v in host["model"].items()}


def _load_model_state(client: cairn.Client, job: str, step: int) -> dict:
    loaded = state(*trained(99), epoch=0)
    dcp.load(loaded, storage_reader=CairnReader(job=job, step=step, client=client))
    return loaded


def test_async_saves_reuse_staging_buffers(daemon: Daemon, job: str) -> None:
    with daemon.client() as c:
        model, optim = trained(8)
        expected = []
        responses = []
        ptrs = []
        for step in (1, 2):
            expected.append({k: v.clone() for k, v in model.state_dict().items()})
            writer = CairnWriter(job=job, step=step, client=c)
            # The second call comes before the first save is waited for: its
            # stage() waits until the first save has written the buffers.
            responses.append(dcp.async_save(state(model, optim, epoch=step), storage_writer=writer))
            ptrs.append(_staged_ptrs(c))
            with torch.no_grad():  # training goes on at once
                for p in model.parameters():
                    p.mul_(-2.0).add_(1.0)
        for response in responses:
            getattr(response, "upload_completion", response).result(timeout=60)
        assert ptrs[0] == ptrs[1]  # the same host buffers, filled twice
        for step, values in zip((1, 2), expected):
            loaded = _load_model_state(c, job, step)
            assert loaded["extra"]["epoch"] == step
            for k, v in values.items():
                assert torch.equal(loaded["model"][k], v), (step, k)
        assert not torch.equal(expected[0]["0.weight"], expected[1]["0.weight"])


def test_failed_async_saves_release_staging_buffers(
    daemon: Daemon, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    with daemon.client() as c:
        model, optim = trained(9)
        dcp.save(state(model, optim, 1), storage_writer=CairnWriter(job=job, step=1, client=c))
        # Fails before writing (step 1 is complete), then fails while writing.
        response = dcp.async_save(state(model, optim, 1), storage_writer=CairnWriter(job=job, step=1, client=c))
        with pytest.raises(BaseException, match="already exists"):
            getattr(response, "upload_completion", response).result(timeout=60)
        ptrs = _staged_ptrs(c)

        def broken(*args: object, **kwargs: object) -> None:
            raise cairn.CairnError("disk on fire")

        started = time.monotonic()
        with monkeypatch.context() as m:
            m.setattr(c, "_save_files", broken)
            response = dcp.async_save(state(model, optim, 2), storage_writer=CairnWriter(job=job, step=2, client=c))
            with pytest.raises(BaseException, match="disk on fire"):
                getattr(response, "upload_completion", response).result(timeout=60)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        response = dcp.async_save(state(model, optim, 3), storage_writer=CairnWriter(job=job, step=3, client=c))
        getattr(response, "upload_completion", response).result(timeout=60)
        # Neither failure kept the buffers locked (no wait for a timeout).
        assert time.monotonic() - started < 8
        assert _staged_ptrs(c) == ptrs
        loaded = _load_model_state(c, job, 3)
        for k, v in expected.items():
            assert torch.equal(loaded["model"][k], v), k
        assert [s.step for s in c.list_steps(job) if s.restorable] == [1, 3]


def test_staging_buffers_follow_the_layout_and_can_be_off(daemon: Daemon, job: str) -> None:
    from cairn import torch as ctorch

    with daemon.client() as c:
        small, big = {"w": torch.arange(4.0)}, {"w": torch.arange(8.0)}
        for step, sd in ((1, small), (2, big)):
            response = dcp.async_save(sd, storage_writer=CairnWriter(job=job, step=step, client=c))
            getattr(response, "upload_completion", response).result(timeout=60)
            assert ctorch._buffers[c]._host["w"].shape == sd["w"].shape
        writer = CairnWriter(job=job, step=3, client=c, cache_staged_state=False)
        response = dcp.async_save(small, storage_writer=writer)
        getattr(response, "upload_completion", response).result(timeout=60)
        assert ctorch._buffers[c]._host["w"].shape == (8,)  # untouched
        writer.close()  # drops the kept copy
        assert ctorch._buffers[c]._host is None
        for step, sd in ((1, small), (2, big), (3, small)):
            loaded = {"w": torch.zeros_like(sd["w"])}
            dcp.load(loaded, storage_reader=CairnReader(job=job, step=step, client=c))
            assert torch.equal(loaded["w"], sd["w"]), step


def test_metadata_commits_last(client: cairn.Client, job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optim = trained(8)
    # The coordinator dies before finish(): the ranks' data is in, the step is not.
    monkeypatch.setattr(CairnWriter, "finish", lambda self, metadata, results: None)
    dcp.save(state(model, optim, 1), storage_writer=CairnWriter(job=job, step=1, client=client))
    monkeypatch.undo()
    steps = client.list_steps(job)
    assert [(s.step, s.restorable) for s in steps] == [(1, False)]
    assert client.latest_step(job) is None
    # DCP wraps the reader's NotFound in its CheckpointException.
    with pytest.raises(BaseException, match="no complete step"):
        dcp.load(state(model, optim, 0), storage_reader=CairnReader(job=job, client=client))
    # The restarted job saves the incomplete step again, without overwrite:
    # the new attempt replaces the stale shard.
    stale = {s.rank: s.attempt for s in steps[0].shards}
    dcp.save(state(model, optim, 2), storage_writer=CairnWriter(job=job, step=1, client=client))
    [step] = client.list_steps(job)
    assert step.restorable and sorted(s.rank for s in step.shards) == [0, 1]
    [attempt] = {s.attempt for s in step.shards}
    assert attempt and attempt != stale[1]
    loaded = state(model, optim, 0)
    dcp.load(loaded, storage_reader=CairnReader(job=job, client=client))
    assert loaded["extra"]["epoch"] == 2


def test_metadata_shard_layout(client: cairn.Client, job: str) -> None:
    model, optim = trained(9)
    dcp.save(state(model, optim, 1), storage_writer=CairnWriter(job=job, step=3, client=client))
    meta_shard = client.restore(job, 3, 0)
    assert meta_shard.metadata["cairn.format"] == "torch-dcp/v1"
    assert meta_shard.world_size == 2
    metadata = pickle.loads(meta_shard["dcp.metadata"].tobytes())
    assert {info.rank for info in metadata.storage_data.values()} == {1}
    data_shard = client.restore(job, 3, 1)
    fqns = {m["fqn"] for m in data_shard.file_metadata.values()}
    assert "model.0.weight" in fqns


# -- two ranks over gloo -------------------------------------------------


def _rank_main(rank: int, world_size: int, port: int, socket: str, job: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Each rank owns half of every tensor (as FSDP/TP would) plus a rank
        # specific entry; DCP's default planner records the chunks.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world_size,))
        torch.manual_seed(123)
        full = {
            "w": torch.randn(8, 6),
            "b": torch.randn(10, dtype=torch.bfloat16),
            "step": torch.tensor(42),
        }
        sd = {
            "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
            "b": distribute_tensor(full["b"], mesh, [Shard(0)]),
            "step": full["step"],
            "meta": {"world": world_size},
        }
        dcp.save(sd, storage_writer=CairnWriter(job=job, step=5, socket=socket))
        dist.barrier()
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation, where gloo's threads can abort a process
    # whose peer already left (torch's teardown, not the checkpoint).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_ranks_save_one_rank_loads(daemon: Daemon, job: str, tmp_path: Path) -> None:
    out = str(tmp_path / "full.pt")
    mp.start_processes(
        _rank_main,
        args=(2, free_port(), daemon.socket, job, out),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    full = torch.load(out)
    with daemon.client() as c:
        steps = c.list_steps(job)
        assert [(s.step, s.restorable) for s in steps] == [(5, True)]
        assert sorted(s.rank for s in steps[0].shards) == [0, 1, 2]
        assert all(s.world_size == 3 for s in steps[0].shards)
        # One process, no process group: DCP reshards the two halves.
        loaded = {
            "w": torch.zeros(8, 6),
            "b": torch.zeros(10, dtype=torch.bfloat16),
            "step": torch.tensor(0),
            "meta": {"world": 0},
        }
        dcp.load(loaded, storage_reader=CairnReader(job=job, client=c))
    assert torch.equal(loaded["w"], full["w"])
    assert torch.equal(loaded["b"], full["b"])
    assert loaded["step"].item() == 42
    assert loaded["meta"] == {"world": 2}


def test_streaming_reader_and_writer_over_tcp(daemon: Daemon, job: str) -> None:
    assert daemon.tcp_addr is not None
    model, optim = trained(10)
    saved = state(model, optim, 4)
    dcp.save(saved, storage_writer=CairnWriter(job=job, step=1, socket=daemon.tcp_addr))
    loaded = state(*trained(11), epoch=0)
    loaded["extra"]["note"] = ""
    dcp.load(loaded, storage_reader=CairnReader(job=job, socket=daemon.tcp_addr))
    assert_state_equal(saved, loaded)
    np.testing.assert_array_equal(
        loaded["model"]["0.weight"].numpy(), model.state_dict()["0.weight"].numpy()
    )


def test_writer_pickles_without_its_client(daemon: Daemon, job: str) -> None:
    with daemon.client() as c:
        writer = CairnWriter(job=job, step=1, client=c)
        clone = pickle.loads(pickle.dumps(writer))
        assert clone._client is None
        assert clone.client.target == c.target


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Cairn runs on Linux", allow_module_level=True)
