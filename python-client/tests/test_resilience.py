"""Daemon restarts and hangs, against a real cairnd.

cairnd is SIGKILLed and started again on the same directories (a DaemonSet
rolling update, an OOM kill) while saves run: every save must succeed, and
a restart longer than ``retry_for`` must end in DaemonUnavailable after
about ``retry_for``. cairnd is SIGSTOPped (a daemon stuck in D-state I/O):
a save or restore must fail with DeadlineExceeded within ``stall_timeout``
plus a margin, and the next save after SIGCONT must succeed with nothing
half-written listed.

Run with ``-s`` to see the figures (time a save waited across a restart,
time to DeadlineExceeded).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import cairn
from conftest import Daemon

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

#: Stall limit in these tests (the default is 60 s).
STALL = 3.0
#: How much later than STALL a hung call may fail.
STALL_MARGIN = 3.0
#: Retry bound while the daemon restarts (generous: it is not what is tested).
RETRY_FOR = 30.0


def tensors_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((64, 256), dtype=np.float32),
        "step": np.array(step, dtype=np.int64),
    }


def assert_step(client: cairn.Client, job: str, step: int, rank: int = 0) -> None:
    restored = client.restore(job, step, rank)
    for name, array in tensors_for(step).items():
        assert restored[name].tobytes() == array.tobytes(), (step, name)


class Restarts(threading.Thread):
    """SIGKILLs cairnd ``count`` times, ``every`` seconds apart, each time
    leaving it down for ``down_for`` seconds before starting it again."""

    def __init__(self, daemon: Daemon, count: int, every: float = 1.5, down_for: float = 0.3):
        super().__init__(daemon=True)
        self.target_daemon = daemon
        self.count, self.every, self.down_for = count, every, down_for
        self.kills: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.count):
                time.sleep(self.every)
                self.kills.append(time.monotonic())
                self.target_daemon.restart(self.down_for)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def save_through_restarts(
    daemon: Daemon, save_step: Callable[[int], None], count: int
) -> tuple[list[int], list[float]]:
    """Saves step after step while cairnd restarts ``count`` times.

    ``save_step`` saves a step and checks it restores byte-identical (at
    once: the daemon keeps only the newest few steps). Returns the steps
    saved and, per restart, how long the save in flight at the kill (or the
    first one after it) took.
    """
    restarts = Restarts(daemon, count)
    spans: list[tuple[float, float]] = []
    step = 0
    restarts.start()
    while restarts.is_alive() or step < 2:
        step += 1
        started = time.monotonic()
        save_step(step)
        spans.append((started, time.monotonic()))
        time.sleep(0.02)
    restarts.join()
    assert restarts.error is None, restarts.error
    # One more save on the settled daemon.
    step += 1
    save_step(step)
    waits = []
    for kill in restarts.kills:
        start, end = next((s, e) for s, e in spans if e >= kill)
        waits.append(end - start)
    return list(range(1, step + 1)), waits


def report(what: str, waits: list[float]) -> None:
    print(
        f"\n{what}: {len(waits)} restarts, save waited median {statistics.median(waits):.2f} s, "
        f"max {max(waits):.2f} s ({', '.join(f'{w:.2f}' for w in waits)})"
    )


# -- restarts ------------------------------------------------------------


def test_saves_ride_through_daemon_restarts(
    restartable_daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cairn")
    job = "restarts"
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:

        def save(step: int) -> None:
            c.save(job, step, 0, tensors_for(step))
            assert_step(c, job, step)

        steps, waits = save_through_restarts(restartable_daemon, save, count=5)
        report("Client.save across cairnd restarts", waits)
        assert max(waits) < 15
        assert c.latest_step(job) == steps[-1]
        listed = c.list_steps(job)
        assert all(s.restorable for s in listed), [
            (s.step, [(sh.rank, sh.attempt) for sh in s.shards]) for s in listed if not s.restorable
        ]
    retries = [r for r in caplog.records if r.name == "cairn" and "retrying" in r.getMessage()]
    assert retries and all(r.levelno == logging.WARNING for r in retries)
    assert any(restartable_daemon.socket in r.getMessage() for r in retries)


def test_async_saves_ride_through_daemon_restarts(restartable_daemon: Daemon) -> None:
    job = "restarts-async"
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:

        def save(step: int) -> None:
            live = tensors_for(step)
            handle = c.save_async(job, step, 0, live)
            assert handle.wait_staged(timeout=RETRY_FOR + 10)
            live["w"][:] = -1.0  # the trainer reuses its buffers once staged
            handle.result(timeout=RETRY_FOR + 10)
            assert_step(c, job, step)

        steps, waits = save_through_restarts(restartable_daemon, save, count=3)
        report("Client.save_async across cairnd restarts", waits)
        assert c.latest_step(job) == steps[-1]


def test_redo_after_staged_uses_the_staged_copy(
    restartable_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon restarts between "staged" (the trainer changes its buffers)
    # and the commit: the redo must save the bytes of the call, not the
    # trainer's new ones.
    from cairn.client import _ShardSave

    real = _ShardSave.mark_staged
    live = tensors_for(1)
    tries = {"n": 0}

    def mark_staged(self: _ShardSave, copies: list) -> None:
        tries["n"] += 1
        first = not self.staged
        real(self, copies)
        if first:
            live["w"][:] = -1.0
            restartable_daemon.restart()

    monkeypatch.setattr(_ShardSave, "mark_staged", mark_staged)
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:
        handle = c.save_async("staged", 1, 0, live)
        result = handle.result(timeout=RETRY_FOR + 10)
        monkeypatch.undo()
        assert tries["n"] == 2  # staged, restarted, redone from the staged copy
        assert c.list_steps("staged")[0].shards[0].attempt == result.attempt
        assert_step(c, "staged", 1)
        # A synchronous save redoes from the caller's (unchanged) tensors.
        monkeypatch.setattr(
            _ShardSave,
            "mark_staged",
            lambda self, copies: (real(self, copies), restartable_daemon.restart()),
        )
        calls = {"n": 0}
        real_restart = restartable_daemon.restart

        def restart_once(down_for: float = 0.0) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                real_restart(down_for)

        monkeypatch.setattr(restartable_daemon, "restart", restart_once)
        c.save("staged", 2, 0, tensors_for(2))
        monkeypatch.undo()
        assert calls["n"] == 2  # staged twice: once per try
        assert_step(c, "staged", 2)


def test_commit_whose_reply_was_lost_counts_as_done(
    restartable_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit lands, then the connection breaks before the reply: the
    # redo's BeginShard finds the shard committed by its own attempt.
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:
        real_call = c._call
        lost = {"n": 0}

        def call(name: str, *args: object, **kwargs: object) -> object:
            result = real_call(name, *args, **kwargs)  # type: ignore[arg-type]
            if name == "CommitShard" and lost["n"] == 0:
                lost["n"] += 1
                raise cairn.DaemonUnavailable(
                    "cairn daemon unavailable: Socket closed", c.target,
                    __import__("grpc").StatusCode.UNAVAILABLE,
                )
            return result

        monkeypatch.setattr(c, "_call", call)
        result = c.save("lost-reply", 1, 0, tensors_for(1))
        monkeypatch.undo()
        assert lost["n"] == 1
        assert result.attempt and c.manifest("lost-reply", 1).attempt == result.attempt
        assert_step(c, "lost-reply", 1)


def test_dcp_saves_ride_through_daemon_restarts(restartable_daemon: Daemon) -> None:
    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from cairn.torch import CairnReader, CairnWriter

    job = "restarts-dcp"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:

        def save(step: int) -> None:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            writer = CairnWriter(job=job, step=step, client=c)
            if step % 2:
                dcp.save({"model": model.state_dict()}, storage_writer=writer)
            else:
                response = dcp.async_save({"model": model.state_dict()}, storage_writer=writer)
                getattr(response, "upload_completion", response).result()
            loaded = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}}
            dcp.load(loaded, storage_reader=CairnReader(job=job, step=step, client=c))
            for k, v in saved.items():
                assert torch.equal(loaded["model"][k], v), (step, k)

        steps, waits = save_through_restarts(restartable_daemon, save, count=3)
        report("dcp.save/async_save across cairnd restarts", waits)
        assert c.latest_step(job) == steps[-1]
        listed = c.list_steps(job)
        broken = [
            (s.step, [(sh.rank, sh.attempt) for sh in s.shards])
            for s in listed
            if not s.restorable
        ]
        # Every listed step restores: retention removes an old step from a
        # tier all at once, never showing it with a rank missing.
        assert not broken, f"steps listed as not restorable after restarts: {broken}"


def _start_later(daemon: Daemon, after: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after), daemon.start()), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "call", ["latest_step", "list_steps", "restore", "manifest", "wait_durable", "delete"]
)
def test_reads_ride_through_a_restart(restartable_daemon: Daemon, call: str) -> None:
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:
        c.save("reads", 1, 0, tensors_for(1))
        c.wait_durable("reads", 1, "disk", timeout=30)  # survives the restart
        restartable_daemon.kill()
        starter = _start_later(restartable_daemon, 1.0)
        started = time.monotonic()
        if call == "latest_step":
            assert c.latest_step("reads") == 1
        elif call == "list_steps":
            assert [s.step for s in c.list_steps("reads")] == [1]
        elif call == "restore":
            assert_step(c, "reads", 1)
        elif call == "manifest":
            assert c.manifest("reads", 1).shard.step == 1
        elif call == "wait_durable":
            c.wait_durable("reads", 1, "disk", timeout=RETRY_FOR)
        else:
            assert c.delete("reads", 1) >= 1
            assert c.list_steps("reads") == []
        assert time.monotonic() - started >= 0.9
        starter.join()


def test_restart_longer_than_retry_for_raises_daemon_unavailable(
    restartable_daemon: Daemon,
) -> None:
    retry_for = 2.0
    with restartable_daemon.client(retry_for=retry_for, stall_timeout=STALL) as c:
        c.save("gone", 1, 0, tensors_for(1))
        restartable_daemon.kill()
        for how in ("save", "save_async", "latest_step"):
            started = time.monotonic()
            with pytest.raises(cairn.DaemonUnavailable) as info:
                if how == "save":
                    c.save("gone", 2, 0, tensors_for(2))
                elif how == "save_async":
                    c.save_async("gone", 2, 0, tensors_for(2)).result(timeout=30)
                else:
                    c.latest_step("gone")
            elapsed = time.monotonic() - started
            print(f"\n{how}: DaemonUnavailable after {elapsed:.2f} s (retry_for {retry_for} s)")
            assert retry_for <= elapsed <= retry_for + 1.5, (how, elapsed)
            assert restartable_daemon.socket in str(info.value)
            assert "retrying for" in str(info.value)
            assert info.value.retried_for is not None and info.value.retried_for >= retry_for
        # The same client works again once the daemon is back.
        restartable_daemon.start()
        c.save("gone", 2, 0, tensors_for(2))
        assert c.latest_step("gone") == 2


# -- hangs ---------------------------------------------------------------


def _assert_stalled(error: BaseException, elapsed: float, daemon: Daemon, call: str) -> None:
    print(f"\n{call}: DeadlineExceeded after {elapsed:.2f} s (stall_timeout {STALL} s)")
    assert STALL * 0.9 <= elapsed <= STALL + STALL_MARGIN, elapsed
    message = str(error)
    assert daemon.socket in message and call in message and "no progress" in message, message


def _pause_on_first_pwrite(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stops the daemon once the client starts writing a shard's bytes."""
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if not daemon.paused:
            daemon.pause()
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)


def _nothing_half_written(
    daemon: Daemon,
    c: cairn.Client,
    job: str,
    saved: list[int],
    check: Callable[[int], None] | None = None,
) -> None:
    """After SIGCONT: the next save succeeds, and every step listed is whole.

    A commit the client gave up on may still land once the daemon runs
    again (like any call that timed out); it lands whole or not at all.
    """
    daemon.resume()
    step = max(saved, default=0) + 100
    c.save(job, step, 0, tensors_for(step))
    listed = c.list_steps(job)
    assert {*saved, step} <= {s.step for s in listed}
    for s in listed:
        assert s.restorable, s
        if s.step == step or check is None:
            assert_step(c, job, s.step)
        else:
            check(s.step)


@pytest.mark.parametrize(
    ("transport", "when"),
    # Stopped before the save, or once the client writes the staged files
    # (the local path: its commit then stalls; the stream path writes none).
    [("local", "before"), ("local", "mid-save"), ("stream", "before")],
)
def test_hung_daemon_fails_a_save_within_the_stall_limit(
    restartable_daemon: Daemon, monkeypatch: pytest.MonkeyPatch, transport: str, when: str
) -> None:
    # Default client settings, with the stall limit from the environment.
    monkeypatch.setenv("CAIRN_STALL_TIMEOUT", str(STALL))
    job = "hung"
    real_pwrite = os.pwrite
    with restartable_daemon.client(transport=transport) as c:
        assert c.stall_timeout == STALL
        c.save(job, 1, 0, tensors_for(1))
        if when == "before":
            restartable_daemon.pause()
        else:
            _pause_on_first_pwrite(restartable_daemon, monkeypatch)
        started = time.monotonic()
        with pytest.raises(cairn.DeadlineExceeded) as info:
            c.save(job, 2, 0, tensors_for(2))
        call = {"local": "CommitShard" if when == "mid-save" else "BeginShard"}.get(
            transport, "WriteShard"
        )
        _assert_stalled(info.value, time.monotonic() - started, restartable_daemon, call)
        monkeypatch.setattr(os, "pwrite", real_pwrite)

        # A background save fails the same way instead of never finishing.
        restartable_daemon.pause()
        started = time.monotonic()
        handle = c.save_async(job, 3, 0, tensors_for(3))
        with pytest.raises(cairn.DeadlineExceeded) as info:
            handle.result(timeout=STALL + 30)
        _assert_stalled(
            info.value, time.monotonic() - started, restartable_daemon,
            "BeginShard" if transport == "local" else "WriteShard",
        )
        _nothing_half_written(restartable_daemon, c, job, [1])


def test_hung_daemon_fails_a_restore_within_the_stall_limit(restartable_daemon: Daemon) -> None:
    for transport in ("local", "stream"):
        with restartable_daemon.client(transport=transport, stall_timeout=STALL) as c:
            c.save(f"hung-{transport}", 1, 0, tensors_for(1))
            restartable_daemon.pause()
            started = time.monotonic()
            with pytest.raises(cairn.DeadlineExceeded) as info:
                c.restore(f"hung-{transport}", 1)
            _assert_stalled(
                info.value, time.monotonic() - started, restartable_daemon,
                "RestoreShard" if transport == "local" else "ReadShard",
            )
            # Small calls are bounded too.
            started = time.monotonic()
            with pytest.raises(cairn.DeadlineExceeded):
                c.latest_step(f"hung-{transport}")
            assert time.monotonic() - started <= STALL + STALL_MARGIN
            restartable_daemon.resume()
            assert_step(c, f"hung-{transport}", 1)


def test_hung_daemon_fails_dcp_saves_within_the_stall_limit(
    restartable_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from cairn.torch import CairnWriter

    job = "hung-dcp"
    model = torch.nn.Linear(64, 64)
    with restartable_daemon.client(stall_timeout=STALL) as c:
        dcp.save({"model": model.state_dict()}, storage_writer=CairnWriter(job=job, step=1, client=c))
        for how in ("save", "async_save"):
            _pause_on_first_pwrite(restartable_daemon, monkeypatch)
            started = time.monotonic()
            writer = CairnWriter(job=job, step=2, client=c)
            with pytest.raises(BaseException, match="no progress") as info:  # DCP wraps it
                if how == "save":
                    dcp.save({"model": model.state_dict()}, storage_writer=writer)
                else:
                    response = dcp.async_save({"model": model.state_dict()}, storage_writer=writer)
                    getattr(response, "upload_completion", response).result(timeout=STALL + 30)
            elapsed = time.monotonic() - started
            print(f"\ndcp.{how}: failed after {elapsed:.2f} s (stall_timeout {STALL} s)")
            assert elapsed <= STALL + STALL_MARGIN
            assert restartable_daemon.socket in str(info.value)
            monkeypatch.undo()
            restartable_daemon.resume()
        # After SIGCONT: the next save succeeds, step 2 saved again without
        # overwrite (it never completed).
        dcp.save({"model": model.state_dict()}, storage_writer=CairnWriter(job=job, step=2, client=c))
        assert [(s.step, s.restorable) for s in c.list_steps(job)] == [(1, True), (2, True)]


# -- cairn.jax (public API) ------------------------------------------------


def test_jax_save_and_restore_ride_through_a_restart(restartable_daemon: Daemon) -> None:
    pytest.importorskip("jax")
    import cairn.jax as cjax

    tree = {"params": {"w": np.arange(4096, dtype=np.float32)}, "step": np.int64(3)}
    with restartable_daemon.client(retry_for=RETRY_FOR, stall_timeout=STALL) as c:
        restartable_daemon.kill()
        starter = _start_later(restartable_daemon, 1.0)
        started = time.monotonic()
        cjax.save(c, "jax-restart", 3, tree)
        assert time.monotonic() - started >= 0.9
        starter.join()
        restartable_daemon.kill()
        starter = _start_later(restartable_daemon, 1.0)
        restored = cjax.restore(c, "jax-restart", target=tree)
        starter.join()
        assert np.array_equal(np.asarray(restored["params"]["w"]), tree["params"]["w"])
        assert int(restored["step"]) == 3


def test_jax_save_and_restore_fail_on_a_hung_daemon(restartable_daemon: Daemon) -> None:
    pytest.importorskip("jax")
    import cairn.jax as cjax

    tree = {"w": np.arange(4096, dtype=np.float32)}
    with restartable_daemon.client(stall_timeout=STALL) as c:
        cjax.save(c, "jax-hung", 1, tree)
        restartable_daemon.pause()
        started = time.monotonic()
        with pytest.raises(cairn.DeadlineExceeded) as info:
            cjax.save(c, "jax-hung", 2, tree)
        _assert_stalled(info.value, time.monotonic() - started, restartable_daemon, "BeginShard")
        started = time.monotonic()
        with pytest.raises(cairn.DeadlineExceeded) as info:
            cjax.restore(c, "jax-hung", 1, target=tree)
        _assert_stalled(info.value, time.monotonic() - started, restartable_daemon, "RestoreShard")

        def same_tree(step: int) -> None:
            restored = cjax.restore(c, "jax-hung", step, target=tree)
            assert np.array_equal(np.asarray(restored["w"]), tree["w"])

        _nothing_half_written(restartable_daemon, c, "jax-hung", [1], same_tree)


# -- a tier away ------------------------------------------------------------

DEAD_BUCKET = """
[object_store]
url = "s3://cairn/ckpt"
request_timeout_secs = 3
[object_store.options]
endpoint = "http://127.0.0.1:1"
allow_http = "true"
region = "us-east-1"
access_key_id = "k"
secret_access_key = "s"
"""


def test_latest_step_never_answers_none_without_the_bucket() -> None:
    # Nothing listens on port 1: the bucket refuses every request. A trainer
    # told "no checkpoint" would start over from step 0, so without the
    # bucket's answer latest_step raises instead; what the node holds itself
    # is still found.
    d = Daemon(config=DEAD_BUCKET)
    try:
        with d.client(retry_for=0) as c:
            with pytest.raises(cairn.TierUnavailable, match="object store"):
                c.latest_step("resume-me")
            c.save("resume-me", 3, 0, tensors_for(3))
            assert c.latest_step("resume-me") == 3
            assert_step(c, "resume-me", 3)
    finally:
        d.cleanup()
