"""cairn.jax: pytrees, and an Orbax CheckpointManager's steps through Cairn."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import cairn  # noqa: E402
import cairn.jax as cjax  # noqa: E402
from conftest import Daemon  # noqa: E402


def train_state(seed: int) -> dict:
    key = jax.random.PRNGKey(seed)
    k1, k2 = jax.random.split(key)
    params = {
        "dense": {
            "kernel": jax.random.normal(k1, (16, 8), dtype=jnp.bfloat16),
            "bias": jnp.zeros((8,), dtype=jnp.float32),
        },
        "embed": jax.random.normal(k2, (32, 4), dtype=jnp.float32),
    }
    mu = jax.tree_util.tree_map(lambda p: p * 0.1, params)
    nu = jax.tree_util.tree_map(lambda p: p * p, params)
    return {
        "params": params,
        "opt_state": ({"count": jnp.array(seed, dtype=jnp.int32)}, {"mu": mu, "nu": nu}),
        "step": jnp.array(seed * 10, dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
        "rng": jax.random.key_data(key),
        "layers": [np.arange(3, dtype=np.uint16), np.zeros((0, 2), dtype=np.float16)],
        "scalars": {"lr": 3e-4, "epoch": 2, "done": False},
    }


def assert_tree_equal(a: object, b: object) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, (bool, int, float)):
            assert type(x) is type(y) and x == y
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype
            assert np.asarray(x).shape == np.asarray(y).shape
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_train_state_round_trip_with_target(client: cairn.Client, job: str) -> None:
    saved = train_state(1)
    result = cjax.save(client, job, 5, saved)
    assert result.step == 5
    target = train_state(2)
    restored = cjax.restore(client, job, target=target)
    assert_tree_equal(saved, restored)
    assert isinstance(restored["params"]["dense"]["kernel"], jax.Array)
    assert restored["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert isinstance(restored["layers"][0], np.ndarray)
    assert restored["scalars"] == {"lr": 3e-4, "epoch": 2, "done": False}


def test_restore_into_abstract_target(client: cairn.Client, job: str) -> None:
    saved = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones((), jnp.bfloat16)}
    cjax.save(client, job, 1, saved)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
    restored = cjax.restore(client, job, 1, target=abstract)
    assert_tree_equal(saved, restored)


def test_restore_without_target_rebuilds_dicts_and_lists(client: cairn.Client, job: str) -> None:
    saved = {"a": [np.arange(3), {"b": np.float32(2.0)}], "c": 7, "d": np.array(ml_dtypes.bfloat16(1.5))}
    cjax.save(client, job, 1, saved)
    restored = cjax.restore(client, job, 1)
    assert restored["a"][0].tolist() == [0, 1, 2]
    assert restored["a"][1]["b"] == np.float32(2.0)
    assert restored["c"] == 7 and isinstance(restored["c"], int)
    assert restored["d"].dtype == ml_dtypes.bfloat16 and float(restored["d"]) == 1.5


def test_default_client_from_environment(
    daemon: Daemon, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_SOCKET", daemon.socket)
    cjax.save(job, 3, {"x": jnp.ones(4)})
    assert cjax.restore(job)["x"].tolist() == [1.0] * 4


def test_target_mismatch_is_invalid_argument(client: cairn.Client, job: str) -> None:
    cjax.save(client, job, 1, {"w": jnp.zeros((2, 2))})
    with pytest.raises(cairn.InvalidArgument, match="shape"):
        cjax.restore(client, job, target={"w": jnp.zeros((3, 2))})
    with pytest.raises(cairn.InvalidArgument, match="dtype"):
        cjax.restore(client, job, target={"w": jnp.zeros((2, 2), jnp.bfloat16)})
    with pytest.raises(cairn.InvalidArgument, match="structure"):
        cjax.restore(client, job, target={"v": jnp.zeros((2, 2))})
    with pytest.raises(cairn.CairnError, match="not a JAX pytree"):
        client.save(job, 2, 0, {"plain": np.zeros(1)})
        cjax.restore(client, job, 2)
    with pytest.raises(cairn.InvalidArgument, match="leaves must be arrays"):
        cjax.save(client, job, 3, {"s": "text"})


def test_save_async_keeps_the_values_at_the_call(client: cairn.Client, job: str) -> None:
    key = jax.random.PRNGKey(3)
    state = {
        "params": {
            "w": jax.random.normal(key, (512, 1024), dtype=jnp.float32),
            "b": jnp.arange(1024, dtype=jnp.bfloat16),
        },
        "host": {"buf": np.arange(1 << 16, dtype=np.int32)},
        "lr": 0.5,
    }
    expected = {
        "params": jax.tree_util.tree_map(np.array, state["params"]),
        "host": {"buf": state["host"]["buf"].copy()},
        "lr": 0.5,
    }
    # Hold the client's background thread, so that the save can only read
    # its bytes after the trainer has moved on.
    gate = threading.Event()
    client._background().submit(gate.wait, 60)
    handle = cjax.save_async(client, job, 7, state)
    assert not handle.done()
    # The trainer goes on at once: each update donates the old arrays and
    # replaces them with new ones, and a numpy buffer is reused in place.
    update = jax.jit(
        lambda p: jax.tree_util.tree_map(lambda x: x * 2 + 1, p), donate_argnums=0
    )
    for _ in range(3):
        state["params"] = update(state["params"])
    state["host"]["buf"][:] = -1
    state["lr"] = 0.25
    del update
    gc.collect()
    gate.set()
    result = handle.result(timeout=60)
    assert result.step == 7 and handle.done() and handle.staged()
    assert_tree_equal(expected, cjax.restore(client, job, 7))
    assert float(state["params"]["w"][0, 0]) != float(expected["params"]["w"][0, 0])


def test_save_blocking_false_returns_a_handle(
    daemon: Daemon, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No client: async saves go through one kept for the process.
    monkeypatch.setenv("CAIRN_SOCKET", daemon.socket)
    handle = cjax.save(job, 1, {"x": jnp.ones(3)}, blocking=False)
    assert isinstance(handle, cairn.SaveHandle)
    handle.wait_durable("disk", timeout=60)
    assert handle.result().step == 1
    second = cjax.save_async(job, 2, {"x": jnp.full(3, 2.0)})
    assert second.result(timeout=60).step == 2
    assert cjax.restore(job)["x"].tolist() == [2.0] * 3


def test_save_async_errors(client: cairn.Client, job: str) -> None:
    # Arguments are checked before the call returns...
    with pytest.raises(cairn.InvalidArgument, match="leaves must be arrays"):
        cjax.save_async(client, job, 1, {"s": "text"})
    with pytest.raises(cairn.InvalidArgument, match="attempt"):
        cjax.save_async(client, job, 1, {"x": jnp.ones(2)}, attempt="no spaces")
    with pytest.raises(cairn.InvalidArgument, match="shared by every rank"):
        cjax.save_async(client, job, 1, {"x": jnp.ones(2)}, rank=1, world_size=2)
    # ...the daemon's answer comes through the handle: a complete step stays immutable.
    cjax.save(client, job, 2, {"x": jnp.ones(2)})
    handle = cjax.save_async(client, job, 2, {"x": jnp.zeros(2)})
    with pytest.raises(cairn.AlreadyExists):
        handle.result(timeout=60)
    assert cjax.restore(client, job, 2)["x"].tolist() == [1.0, 1.0]


def test_incomplete_step_is_saved_again_under_a_new_attempt(
    client: cairn.Client, job: str
) -> None:
    # Rank 0 of a two-rank step committed, then the job crashed before rank 1.
    cjax.save(client, job, 4, {"x": jnp.zeros(4)}, rank=0, world_size=2, attempt="run1-4")
    assert client.latest_step(job) is None
    # The restarted job saves the step again with one new attempt for both ranks.
    for rank in (0, 1):
        handle = cjax.save_async(
            client, job, 4, {"x": jnp.full(4, float(rank + 1))},
            rank=rank, world_size=2, attempt="run2-4",
        )  # fmt: skip
        handle.result(timeout=60)
    assert client.latest_step(job) == 4
    assert client.manifest(job, 4, 0).attempt == "run2-4"
    assert cjax.restore(client, job, 4, rank=0)["x"].tolist() == [1.0] * 4
    assert cjax.restore(client, job, 4, rank=1)["x"].tolist() == [2.0] * 4


def test_orbax_checkpoint_manager_through_cairn(
    client: cairn.Client, job: str, tmp_path: Path
) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    state = {
        "params": {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones(8, jnp.bfloat16)},
        "step": jnp.array(0, dtype=jnp.int32),
    }
    # Trainer: Orbax writes each step into its (tmpfs) directory, Cairn keeps it.
    with ocp.CheckpointManager(tmp_path / "run-a") as manager:
        for step in (100, 200):
            state = jax.tree_util.tree_map(lambda x: x + 1, state)
            manager.save(step, args=ocp.args.StandardSave(state))
            cjax.save_orbax_step(client, job, step, manager)
    assert [s.step for s in client.list_steps(job)] == [100, 200]

    # A fresh pod: the directory is gone; Cairn lays the newest step back.
    with ocp.CheckpointManager(tmp_path / "run-b") as manager:
        assert manager.latest_step() is None
        step = cjax.restore_orbax_step(client, job, manager)
        assert step == 200 and manager.latest_step() == 200
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    assert_tree_equal(state, restored)
