"""cairn.Client against a real cairnd: bytes, errors, aborts, streaming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import cairn
from cairn.client import STREAM_MESSAGE_BYTES
from conftest import Daemon

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
]


def random_array(dtype: object, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bit patterns (NaNs included) of ``dtype``."""
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    array = raw.view(dt).reshape(shape)
    if dt == np.bool_:
        array = raw.astype(bool).reshape(shape)
    return array


def assert_same(restored: np.ndarray, original: np.ndarray) -> None:
    assert restored.dtype == original.dtype
    assert restored.shape == original.shape
    assert restored.tobytes() == np.ascontiguousarray(original).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_is_byte_identical(client: cairn.Client, job: str, dtype: object) -> None:
    tensors = {
        "matrix": random_array(dtype, (7, 5), seed=1),
        "scalar": random_array(dtype, (), seed=2),
        "empty": random_array(dtype, (0, 3), seed=3),
        "cube": random_array(dtype, (2, 3, 4), seed=4),
    }
    result = client.save(job, 3, 0, tensors)
    assert (result.job, result.step, result.rank, result.file_count) == (job, 3, 0, 4)
    restored = client.restore(job, 3, 0)
    assert set(restored) == set(tensors)
    for name, original in tensors.items():
        assert_same(restored[name], original)
        assert not restored[name].flags.writeable
    assert restored.file_metadata["matrix"]["dtype"] == np.dtype(dtype).name
    assert restored.file_metadata["scalar"]["shape"] == "[]"


def test_restored_arrays_view_the_memory_tier(client: cairn.Client, job: str) -> None:
    client.save(job, 1, 0, {"w": np.arange(1 << 16, dtype=np.float32)})
    restored = client.restore(job)
    array = restored["w"]
    assert not restored.streamed
    assert isinstance(array.base, memoryview) or array.base is not None
    with pytest.raises(ValueError):
        array[0] = 1.0
    writable = client.restore(job, writable=True)["w"]
    writable[0] = 42.0  # a private copy-on-write page
    assert client.restore(job)["w"][0] == 0.0


def test_names_strided_big_endian_and_bytes(client: cairn.Client, job: str) -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "model.layers.0.attn/q_proj.weight": base.T,  # strided
        "['params']['w']": base[::2, 1::2],
        "": np.array([1, 2, 3], dtype=np.int32),
        ".hidden -x é": np.arange(4, dtype=">i4"),  # big-endian input
        "raw": b"\x00\x01\x02hello",
        "buf": bytearray(b"abc"),
        "view": memoryview(np.arange(3, dtype=np.int16)),
        "np-scalar": np.float32(2.5),
        "x" * 500: np.ones(2, dtype=np.uint8),
    }
    client.save(job, 1, 0, tensors, metadata={"epoch": "7"})
    restored = client.restore(job, 1)
    assert restored.metadata["epoch"] == "7"
    assert_same(restored["model.layers.0.attn/q_proj.weight"], base.T)
    assert_same(restored["['params']['w']"], base[::2, 1::2])
    assert_same(restored[""], np.array([1, 2, 3], dtype=np.int32))
    assert restored[".hidden -x é"].tolist() == [0, 1, 2, 3]
    assert restored[".hidden -x é"].dtype == np.dtype("<i4")
    assert restored["raw"].tobytes() == b"\x00\x01\x02hello"
    assert restored["buf"].tobytes() == b"abc"
    assert restored["view"].tolist() == [0, 1, 2]
    assert restored["np-scalar"].shape == () and restored["np-scalar"] == np.float32(2.5)
    assert restored["x" * 500].tolist() == [1, 1]


def test_torch_and_jax_tensors(client: cairn.Client, job: str) -> None:
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "t": t,
        "t_bf16": torch.linspace(-3, 3, 10, dtype=torch.bfloat16),
        "t_strided": t.t(),
        "t_grad": torch.ones(3, requires_grad=True),
        "t_bool": torch.tensor([True, False]),
        "t_scalar": torch.tensor(5, dtype=torch.int64),
        "t_empty": torch.empty(0, 2, dtype=torch.float16),
        "j": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
    }
    client.save(job, 1, 0, tensors)
    restored = client.restore(job, 1)
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            expected = value.detach().contiguous()
            assert restored[name].shape == tuple(expected.shape)
            assert restored[name].dtype.name == str(expected.dtype).removeprefix("torch.")
            assert restored[name].tobytes() == expected.reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            assert_same(restored[name], np.asarray(value))


def test_list_latest_delete(client: cairn.Client, job: str) -> None:
    assert client.list_steps(job) == []
    assert client.latest_step(job) is None
    for step in (10, 20):
        client.save(job, step, 0, {"a": np.full(4, step, dtype=np.int32)})
    # An incomplete step (rank 0 of 2) is listed but not restorable.
    client.save(job, 30, 0, {"a": np.zeros(1)}, world_size=2)
    steps = client.list_steps(job)
    assert [s.step for s in steps] == [10, 20, 30]
    assert [s.restorable for s in steps] == [True, True, False]
    # The newest step is in memory; older ones may already be evicted to disk.
    assert steps[-1].shards[0].tiers[cairn.Tier.MEMORY] == cairn.ShardState.DURABLE
    assert client.latest_step(job) == 20
    assert client.latest_step(job, complete_only=False) == 30
    latest = client.restore(job)
    assert latest.step == 20 and latest["a"].tolist() == [20] * 4
    assert client.delete(job, 20) == 1
    assert client.latest_step(job) == 10
    with pytest.raises(cairn.NotFound):
        client.restore(job, 20)
    assert job in client.list_jobs()


def test_committed_shards_are_immutable(client: cairn.Client, job: str) -> None:
    client.save(job, 1, 0, {"a": np.zeros(2)})
    with pytest.raises(cairn.AlreadyExists, match="immutable"):
        client.save(job, 1, 0, {"a": np.ones(2)})
    assert client.restore(job, 1)["a"].tolist() == [0.0, 0.0]


def test_bad_names_raise_invalid_argument_naming_the_field(client: cairn.Client) -> None:
    with pytest.raises(cairn.InvalidArgument, match=r"job") as info:
        client.save("bad/job name", 1, 0, {"a": np.zeros(1)})
    assert isinstance(info.value, ValueError)
    with pytest.raises(cairn.InvalidArgument, match=r"job"):
        client.restore("-dash")
    with pytest.raises(cairn.InvalidArgument, match=r"files\[0\]\.name"):
        client._save_files(
            client._ref("ok-job", 1, 0),
            [(".hidden", 1, {}, lambda: (memoryview(b"x"), None))],
            1,
            {},
        )
    with pytest.raises(cairn.InvalidArgument, match=r"metadata"):
        client.save("ok-job", 1, 0, {"a": np.zeros(1)}, metadata={"cairn.format": "x"})
    with pytest.raises(cairn.InvalidArgument, match=r"step"):
        client.save("ok-job", -1, 0, {"a": np.zeros(1)})
    with pytest.raises(cairn.InvalidArgument, match=r"tensors\['o'\]"):
        client.save("ok-job", 1, 0, {"o": np.array([object()])})
    with pytest.raises(cairn.InvalidArgument, match="tier"):
        client.wait_durable("ok-job", 1, "tape")


def _failing_pwrite(after: int, exc: BaseException):  # type: ignore[no-untyped-def]
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return real(fd, data, offset)  # type: ignore[arg-type]

    return pwrite


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_save_leaves_nothing_and_can_be_retried(
    client: cairn.Client, job: str, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    tensors = {f"t{i}": np.full(1000, i, dtype=np.float32) for i in range(4)}
    monkeypatch.setattr(os, "pwrite", _failing_pwrite(2, exc))
    with pytest.raises(type(exc)):
        client.save(job, 5, 0, tensors)
    monkeypatch.undo()
    assert client.list_steps(job) == []
    assert client.status().open_sessions == 0
    client.save(job, 5, 0, tensors)
    restored = client.restore(job, 5)
    assert [restored[f"t{i}"][0] for i in range(4)] == [0, 1, 2, 3]


def test_killed_writer_leaves_nothing_listed(tmp_path: Path) -> None:
    # The default session timeout (minutes) must not matter: the daemon sees
    # that the writer's process is gone and hands the shard to the next one.
    daemon = Daemon()
    try:
        script = textwrap.dedent(
            f"""
            import os, signal, numpy as np, cairn
            real = os.pwrite
            def pwrite(fd, data, offset):
                n = real(fd, data, offset)
                os.kill(os.getpid(), signal.SIGKILL)  # dies mid-save
                return n
            os.pwrite = pwrite
            cairn.Client({daemon.socket!r}).save(
                "killed", 1, 0, {{"a": np.ones(1000), "b": np.ones(1000)}})
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path)
        assert proc.returncode == -signal.SIGKILL
        with daemon.client() as c:
            assert c.list_steps("killed") == []
            # A restarted trainer saves the same shard at once.
            c.save("killed", 1, 0, {"a": np.zeros(3)})
            assert c.restore("killed", 1)["a"].tolist() == [0.0, 0.0, 0.0]
    finally:
        daemon.cleanup()


def test_daemon_unavailable_names_the_socket(fresh_daemon: Daemon, tmp_path: Path) -> None:
    # retry_for=0: no retries, the error comes at once (test_resilience.py
    # covers the retries).
    missing = tmp_path / "nobody-here.sock"
    with cairn.Client(str(missing), retry_for=0) as c:
        started = time.monotonic()
        with pytest.raises(cairn.DaemonUnavailable, match=str(missing)) as info:
            c.list_steps("job")
        assert time.monotonic() - started < 5
        assert isinstance(info.value, ConnectionError)
        assert info.value.target == f"unix:{missing}"
        assert info.value.retried_for is None
    with fresh_daemon.client(retry_for=0) as c:
        c.save("j", 1, 0, {"a": np.zeros(1)})
        fresh_daemon.stop()
        with pytest.raises(cairn.DaemonUnavailable, match=fresh_daemon.socket):
            c.save("j", 2, 0, {"a": np.zeros(1)})
        with pytest.raises(cairn.DaemonUnavailable, match=fresh_daemon.socket):
            c.restore("j")


def test_timeouts_and_retries_from_arguments_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAIRN_RETRY_FOR", raising=False)
    monkeypatch.delenv("CAIRN_STALL_TIMEOUT", raising=False)
    c = cairn.Client("x.sock")
    assert (c.retry_for, c.stall_timeout, c.timeout) == (60.0, 60.0, None)
    assert c._small_deadline() == 30.0 and c._bulk_deadline() == 60.0
    monkeypatch.setenv("CAIRN_RETRY_FOR", "7.5")
    monkeypatch.setenv("CAIRN_STALL_TIMEOUT", "4")
    c = cairn.Client("x.sock")
    assert (c.retry_for, c.stall_timeout) == (7.5, 4.0)
    assert c._small_deadline() == 4.0 and c._bulk_deadline() == 4.0
    # Arguments beat the environment; 0 turns each off.
    c = cairn.Client("x.sock", retry_for=0, stall_timeout=0)
    assert (c.retry_for, c.stall_timeout) == (0.0, None)
    assert c._small_deadline() == 30.0 and c._bulk_deadline() is None
    # A number: every call's deadline, as before; the stall limit still applies.
    c = cairn.Client("x.sock", timeout=5)
    assert c.timeout == 5.0 and c._small_deadline() == 5.0 and c._bulk_deadline() == 4.0
    # None: wait forever, unless a stall limit is asked for explicitly.
    c = cairn.Client("x.sock", timeout=None)
    assert c.stall_timeout is None and c._small_deadline() is None and c._bulk_deadline() is None
    assert cairn.Client("x.sock", timeout=None, stall_timeout=9)._bulk_deadline() == 9.0
    monkeypatch.setenv("CAIRN_STALL_TIMEOUT", "soon")
    with pytest.raises(cairn.InvalidArgument, match="CAIRN_STALL_TIMEOUT"):
        cairn.Client("x.sock")
    with pytest.raises(cairn.InvalidArgument, match="retry_for"):
        cairn.Client("x.sock", retry_for=-1)


def test_attempts_are_recorded_and_checked(client: cairn.Client, job: str) -> None:
    result = client.save(job, 1, 0, {"a": np.zeros(2)})
    assert len(result.attempt) == 32  # a fresh uuid4 hex per call
    mine = client.save(job, 2, 0, {"a": np.zeros(2)}, attempt="run-7.step-2")
    assert mine.attempt == "run-7.step-2"
    steps = client.list_steps(job)
    assert [s.shards[0].attempt for s in steps] == [result.attempt, "run-7.step-2"]
    assert client.manifest(job, 2).attempt == "run-7.step-2"
    with pytest.raises(cairn.InvalidArgument, match="attempt"):
        client.save(job, 3, 0, {"a": np.zeros(2)}, attempt="no spaces")
    with pytest.raises(cairn.InvalidArgument, match="attempt"):
        client.save(job, 3, 0, {"a": np.zeros(2)}, attempt="x" * 65)


def test_incomplete_step_is_saved_again_by_a_new_attempt(client: cairn.Client, job: str) -> None:
    # Rank 0 of 2 committed, rank 1 never did (the run crashed).
    client.save(job, 5, 0, {"a": np.zeros(4)}, world_size=2, attempt="crashed")
    # The restarted run saves the step again under its own attempt.
    client.save(job, 5, 0, {"a": np.ones(4)}, world_size=2, attempt="rerun")
    client.save(job, 5, 1, {"a": np.full(4, 2.0)}, world_size=2, attempt="rerun")
    [step] = client.list_steps(job)
    assert step.restorable and {s.attempt for s in step.shards} == {"rerun"}
    assert client.restore(job, 5, 0)["a"].tolist() == [1.0] * 4
    # A complete step is immutable, whatever the attempt.
    with pytest.raises(cairn.AlreadyExists):
        client.save(job, 5, 0, {"a": np.zeros(4)}, world_size=2, attempt="third")
    # The crashed run's attempt was superseded: a zombie rank is refused.
    with pytest.raises(cairn.Aborted, match="superseded"):
        client.save(job, 5, 1, {"a": np.zeros(4)}, world_size=2, attempt="crashed")
    assert client.restore(job, 5, 1)["a"].tolist() == [2.0] * 4


def test_saving_again_with_the_same_attempt_is_done_already(client: cairn.Client, job: str) -> None:
    # What a redo finds when its first try's commit landed but the reply was
    # lost in a daemon restart: the shard, committed by this very attempt.
    first = client.save(job, 1, 0, {"a": np.arange(3)}, world_size=2, attempt="same")
    again = client.save(job, 1, 0, {"a": np.arange(3)}, world_size=2, attempt="same")
    assert again.attempt == "same" and again.manifest_hash == first.manifest_hash
    assert (again.total_bytes, again.file_count) == (first.total_bytes, first.file_count)


def test_socket_from_environment(daemon: Daemon, job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_SOCKET", daemon.socket)
    with cairn.Client() as c:
        assert c.target == f"unix:{daemon.socket}"
        c.save(job, 1, 0, {"a": np.arange(3)})
        assert c.restore(job)["a"].tolist() == [0, 1, 2]
    monkeypatch.delenv("CAIRN_SOCKET")
    # Nothing named: the host's socket, when it exists (else an error that
    # names every way, in test_pod.py).
    monkeypatch.setattr(cairn.client, "DEFAULT_SOCKET", daemon.socket)
    assert cairn.Client().target == f"unix:{daemon.socket}"


def _big_tensors() -> dict[str, np.ndarray]:
    return {
        "big": random_array(np.float32, (3 * STREAM_MESSAGE_BYTES // 4 + 123,), seed=9),
        "bf16": random_array(ml_dtypes.bfloat16, (33, 17), seed=10),
        "empty": np.zeros((0,), dtype=np.int8),
        "scalar": np.array(7, dtype=np.int16),
    }


def test_streaming_over_tcp_is_byte_identical(daemon: Daemon, client: cairn.Client, job: str) -> None:
    assert daemon.tcp_addr is not None
    tensors = _big_tensors()
    with cairn.Client(daemon.tcp_addr) as remote:
        assert remote.target == daemon.tcp_addr
        result = remote.save(job, 1, 0, tensors)
        assert result.total_bytes == sum(t.nbytes for t in tensors.values())
        restored = remote.restore(job, 1)
        assert restored.streamed
        for name, original in tensors.items():
            assert_same(restored[name], original)
            assert not restored[name].flags.writeable
        # Saved remotely, restored locally, and the other way round.
        local = client.restore(job, 1)
        assert not local.streamed
        for name, original in tensors.items():
            assert_same(local[name], original)
        client.save(job, 2, 0, tensors)
        for name, original in tensors.items():
            assert_same(remote.restore(job, 2)[name], original)


def test_stream_transport_over_unix_socket(daemon: Daemon, job: str) -> None:
    tensors = _big_tensors()
    with daemon.client(transport="stream") as c:
        c.save(job, 1, 0, tensors)
        restored = c.restore(job)
        assert restored.streamed
        for name, original in tensors.items():
            assert_same(restored[name], original)


def test_unreachable_staged_files_fall_back_to_streaming(
    client: cairn.Client, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As from another mount namespace: the daemon's paths do not exist here.
    real_open = os.open

    def open_elsewhere(path: str, flags: int, *args: int) -> int:
        if str(path).startswith("/dev/shm/cairn-test-"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_elsewhere)
    with cairn.Client(client.target) as c:
        tensors = _big_tensors()
        c.save(job, 1, 0, tensors)
        restored = c.restore(job, 1)
        assert restored.streamed
        for name, original in tensors.items():
            assert_same(restored[name], original)
    assert client.status().open_sessions == 0


def test_save_async(client: cairn.Client, job: str) -> None:
    tensors = {"w": np.arange(1 << 20, dtype=np.float32)}
    handle = client.save_async(job, 4, 0, tensors)
    assert handle.wait_staged(timeout=30)
    tensors["w"][:] = -1  # the caller may reuse its buffer once staged
    result = handle.result(timeout=30)
    assert handle.done() and result.step == 4
    handle.wait_durable("memory", timeout=30)
    handle.wait_durable(cairn.Tier.DISK, timeout=60)
    step = client.list_steps(job)[0]
    assert step.durable_in("disk")
    restored = client.restore(job, 4)["w"]
    assert restored[0] == 0 and restored[-1] == (1 << 20) - 1
    # Failures surface through result(); buffers count as released.
    bad = client.save_async(job, 4, 0, {"w": np.zeros(1)})
    with pytest.raises(cairn.AlreadyExists):
        bad.result(timeout=30)
    assert bad.staged()


def test_saves_over_pooled_pages_are_byte_identical(
    fresh_daemon: Daemon, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deleted step's files go to the daemon's page pool; the next save
    # copies into those pages through a mapping instead of pwrite.
    from cairn import _arrays

    pwrites: list[int] = []
    real = _arrays.pwrite_all
    monkeypatch.setattr(
        _arrays, "pwrite_all", lambda fd, view, offset=0: (pwrites.append(view.nbytes), real(fd, view, offset))
    )
    with fresh_daemon.client() as client:
        sizes = {"a": (3 << 20) // 4, "b": (1 << 20) // 4 + 5, "c": 7}
        first = {name: random_array(np.float32, (n,), seed=1) for name, n in sizes.items()}
        client.save(job, 1, 0, first)
        client.delete(job, 1)
        pwrites.clear()
        second = {name: random_array(np.float32, (n,), seed=2) for name, n in sizes.items()}
        client.save(job, 2, 0, second)
        restored = client.restore(job, 2)
        for name, original in second.items():
            assert_same(restored[name], original)
        # The big files were mapped (pooled pages); only the tiny one went through pwrite.
        assert all(n < (1 << 20) for n in pwrites), pwrites


def test_wait_durable_errors(client: cairn.Client, job: str) -> None:
    with pytest.raises(cairn.NotFound):
        client.wait_durable(job, 1, "disk", timeout=1)
    client.save(job, 1, 0, {"a": np.zeros(1)})
    client.wait_durable(job, 1, "memory", timeout=5)
    with pytest.raises(cairn.FailedPrecondition, match="no object store"):
        client.wait_durable(job, 1, cairn.Tier.OBJECT_STORE, timeout=1)


def test_memory_tier_full_is_resource_exhausted() -> None:
    daemon = Daemon(memory_capacity=1 << 20)
    try:
        with daemon.client() as c:
            with pytest.raises(cairn.ResourceExhausted):
                c.save("full", 1, 0, {"a": np.zeros(1 << 19), "b": np.zeros(1 << 19)})
            assert c.list_steps("full") == []
            c.save("full", 1, 0, {"a": np.zeros(1000)})
    finally:
        daemon.cleanup()


def test_tenants_are_separate(daemon: Daemon, job: str) -> None:
    with daemon.client(tenant="team-a") as a, daemon.client(tenant="team-b") as b:
        a.save(job, 1, 0, {"x": np.ones(2)})
        assert a.latest_step(job) == 1
        assert b.list_steps(job) == []
        with pytest.raises(cairn.NotFound):
            b.restore(job)
        assert a.restore(job).tenant == "team-a"


def test_directory_round_trip(client: cairn.Client, job: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub dir" / ".zarray-like").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "_CHECKPOINT_METADATA").write_text('{"step": 1}')
    (src / "sub dir" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (src / "sub dir" / ".zarray-like" / "0.0").write_bytes(b"")
    (src / "-odd name").write_bytes(b"odd")
    client.save_directory(job, 1, 0, src)
    dst = tmp_path / "dst"
    assert client.restore_directory(job, dst) == 1

    def listing(root: Path) -> dict[str, bytes | None]:
        return {
            str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))
        }

    assert listing(dst) == listing(src)


def test_context_manager_closes(daemon: Daemon, job: str) -> None:
    with daemon.client() as c:
        handle = c.save_async(job, 1, 0, {"a": np.zeros(10)})
    # close() waited for the background save.
    assert handle.done() and handle.result().step == 1
    with pytest.raises(cairn.CairnError, match="closed"):
        c.save_async(job, 2, 0, {"a": np.zeros(10)})


def test_import_needs_no_framework() -> None:
    code = "import sys, cairn; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_targets() -> None:
    assert cairn.Client("127.0.0.1:7070").target == "127.0.0.1:7070"
    assert cairn.Client("tcp://node-1:7070").target == "node-1:7070"
    assert cairn.Client("unix:///run/x.sock").target == "unix:/run/x.sock"
    assert cairn.Client("rel.sock").target == f"unix:{os.path.abspath('rel.sock')}"
    with pytest.raises(cairn.InvalidArgument, match="transport"):
        cairn.Client("127.0.0.1:7070", transport="local")
