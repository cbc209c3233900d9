"""A trainer in a pod: nothing but its Cairn CSI volume.

The "pod" is a process in its own mount namespace (``unshare --mount``),
running as an unprivileged user, that sees the volume's ``data/`` at its
mount path and nothing of the host's socket directory or the memory tier
(empty tmpfs mounts over both). The volume is laid out and bound as
cairn-csi does it (``volume.json`` in the daemon's volumes directory, then
``Admin.BindVolume`` over the host socket). From inside, the client finds
the volume's socket through ``CAIRN_VOLUME``, saves and restores, and
round-trips a PyTorch DCP checkpoint; it cannot act for another tenant or
job, whatever it asks for. ``cairn.jax`` round-trips a pytree the same way.

Needs root (mount namespaces); skipped without it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cairn
from cairn._proto.cairn.v1 import cairn_pb2 as pb
from conftest import Daemon

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="needs root, unshare and setpriv (mount namespaces stand in for pods)",
)

#: The unprivileged user the pod's process runs as.
POD_UID = 65534


@functools.cache
def pod_user() -> tuple[list[str], int]:
    """How the pod's process drops root, and the uid it then has.

    uid 65534 when it can run this interpreter and import the client (the
    repository is readable by others, as in a fresh clone under /tmp or
    /work); otherwise (a checkout under a private home directory) root
    without any capability, which still cannot read past file modes it does
    not own and changes nothing else about what the pod sees.
    """
    unprivileged = ["setpriv", "--reuid", str(POD_UID), "--regid", str(POD_UID), "--clear-groups"]
    probe = subprocess.run(
        [*unprivileged, sys.executable, "-c", "import cairn, numpy"],
        capture_output=True,
        cwd="/",
    )
    if probe.returncode == 0:
        return unprivileged, POD_UID
    print(
        f"test_pod: uid {POD_UID} cannot run {sys.executable} here; the pod runs as root "
        "without capabilities instead"
    )
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"], 0


def publish(daemon: Daemon, volume_id: str, namespace: str, job: str, **extra: object) -> Path:
    """Lays the volume out as cairn-csi does and binds it; its data/."""
    volume = Path(daemon.memory_dir) / "volumes" / volume_id
    data = volume / "data"
    data.mkdir(parents=True)
    # A pod's fsGroup would own it; here the pod's user may write.
    data.chmod(0o777)
    spec = {
        "format": 1,
        "volume_id": volume_id,
        "target_path": f"/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/{volume_id}/mount",
        "tenant": namespace,
        "job": job,
        "rank": 0,
        "restore": "none",
        "pod": {"namespace": namespace, "name": "train-0", "uid": "1234"},
        **extra,
    }
    (volume / "volume.json").write_text(json.dumps(spec))
    with daemon.client() as host:
        bound = host._stubs.admin.BindVolume(pb.BindVolumeRequest(volume_id=volume_id), timeout=30)
    assert bound.tenant == namespace
    return data


POD_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import cairn

    out = {"uid": os.geteuid()}
    out["host_socket_visible"] = os.path.exists(sys.argv[1])
    out["memory_tier_listing"] = os.listdir(sys.argv[2])
    job = sys.argv[3]
    weights = np.arange(1 << 20, dtype=np.float32)
    with cairn.Client() as c:
        c.save(job, 1, 0, {"w": weights}, world_size=1)
        out["saved_through_files"] = c._files_local
        restored = c.restore(job)
        out["restored_streamed"] = restored.streamed
        out["restored_in_volume"] = os.listdir(
            os.path.join(os.environ["CAIRN_VOLUME"], ".cairn", "restored")
        )
        out["restored_step"] = restored.step
        out["identical"] = restored["w"].tobytes() == weights.tobytes()
        out["listed"] = [s.step for s in c.list_steps(job)]
        for name, call in {
            "other_job": lambda: c.list_steps("someone-elses-job"),
            "other_tenant": lambda: cairn.Client(tenant="team-b").list_steps(job),
            "other_tenant_restore": lambda: cairn.Client(tenant="team-b").restore(job),
            "status": lambda: c.status(),
        }.items():
            try:
                call()
                out[name] = "allowed"
            except cairn.PermissionDenied as e:
                out[name] = "denied: " + e.message
        out["ping"] = c.ping()

    import torch
    import torch.distributed.checkpoint as dcp
    from cairn.torch import CairnReader, CairnWriter

    state = {"layer.weight": torch.randn(64, 32), "step": torch.tensor(7)}
    dcp.save(state, storage_writer=CairnWriter(job=job, step=3))
    loaded = {"layer.weight": torch.zeros(64, 32), "step": torch.tensor(0)}
    dcp.load(loaded, storage_reader=CairnReader(job=job, step=3))
    out["dcp_identical"] = all(torch.equal(loaded[k], state[k]) for k in state)

    import jax.numpy as jnp
    import cairn.jax as cjax

    tree = {"a": jnp.arange(8.0), "b": {"c": jnp.ones((2, 3), dtype=jnp.bfloat16)}}
    cjax.save(job, 9, tree)  # its own client, from CAIRN_VOLUME
    back = cjax.restore(job, 9, target=tree)
    out["jax_identical"] = bool(jnp.array_equal(back["a"], tree["a"])) and bool(
        jnp.array_equal(back["b"]["c"], tree["b"]["c"])
    )
    print(json.dumps(out))
    """
)


def run_in_pod(daemon: Daemon, data: Path, script: str, *args: str) -> dict:
    """Runs ``script`` as the pod: own mount namespace, the volume at
    ``<tmp>/mnt``, the host socket directory and the memory tier hidden,
    an unprivileged user. Returns the JSON it prints."""
    # Somewhere the pod's user can reach (pytest's own directory is root's).
    pod_root = Path(tempfile.mkdtemp(prefix="cairn-pod-"))
    pod_root.chmod(0o755)
    mount = pod_root / "mnt"
    mount.mkdir()
    script_path = pod_root / "pod.py"
    script_path.write_text(script)
    script_path.chmod(0o644)
    inner = " && ".join(
        [
            f"mount --bind {data} {mount}",
            f"mount -t tmpfs -o size=1m,mode=0755 none {daemon.dir}",
            f"mount -t tmpfs -o size=1m,mode=0755 none {daemon.memory_dir}",
            "exec " + " ".join(pod_user()[0]) + f" {sys.executable} {script_path} " + " ".join(args),
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN")}
    env.update(CAIRN_VOLUME=str(mount), HOME=str(pod_root), CAIRN_RETRY_FOR="0")
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        shutil.rmtree(pod_root, ignore_errors=True)
    assert result.returncode == 0, f"the pod failed:\n{result.stderr[-4000:]}\n{daemon.log()}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_pod_saves_and_restores_through_its_volume_alone(daemon: Daemon, job: str) -> None:
    data = publish(daemon, f"csi-{job}", "team-a", job)
    out = run_in_pod(daemon, data, POD_SCRIPT, daemon.socket, daemon.memory_dir, job)
    assert out["uid"] == pod_user()[1]
    assert not out["host_socket_visible"] and out["memory_tier_listing"] == []
    assert out["identical"] and out["restored_step"] == 1 and out["listed"] == [1]
    # The fast path, inside the pod: the bytes went through files in the
    # volume both ways, not through WriteShard or ReadShard.
    assert out["saved_through_files"] is True
    assert out["restored_streamed"] is False
    assert len(out["restored_in_volume"]) == 1
    for name in ("other_job", "other_tenant", "other_tenant_restore", "status"):
        assert out[name].startswith("denied: "), (name, out[name])
    assert "someone-elses-job" in out["other_job"] and "team-a" in out["other_job"]
    assert '"team-b"' in out["other_tenant"]
    assert out["ping"] is True
    assert out["dcp_identical"] and out["jax_identical"]

    # On the host, the step is team-a's: the namespace decided, not the pod.
    with daemon.client(tenant="team-a") as host:
        assert [s.step for s in host.list_steps(job)] == [1, 3, 9]
        weights = host.restore(job, step=1)["w"]
        assert weights.tobytes() == np.arange(1 << 20, dtype=np.float32).tobytes()
    with daemon.client() as host:
        assert host.list_steps(job) == []


def test_without_a_volume_or_socket_the_error_names_every_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CAIRN_VOLUME", raising=False)
    monkeypatch.delenv("CAIRN_SOCKET", raising=False)
    monkeypatch.setattr(cairn.client, "DEFAULT_SOCKET", str(tmp_path / "absent.sock"))
    with pytest.raises(cairn.InvalidArgument) as err:
        cairn.Client()
    for way in ("volume=", "CAIRN_VOLUME", "CAIRN_SOCKET"):
        assert way in err.value.message
    with pytest.raises(cairn.InvalidArgument, match="no Cairn socket at"):
        cairn.Client(volume=tmp_path)
    monkeypatch.setenv("CAIRN_VOLUME", str(tmp_path))
    with pytest.raises(cairn.InvalidArgument, match="CAIRN_VOLUME"):
        cairn.Client()


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import cairn
    from cairn._proto.cairn.v1 import cairn_pb2 as pb

    job = sys.argv[1]
    volume = os.environ["CAIRN_VOLUME"]
    with cairn.Client() as c:
        begun = c._stubs.checkpoint.BeginShard(
            pb.BeginShardRequest(
                shard=pb.ShardRef(job=job, step=5, rank=0),
                files=[pb.FileSpec(name="w", size=1 << 20)],
            ),
            timeout=30,
        )
        path = os.path.join(volume, begun.files[0].path)
        with open(path, "r+b") as f:
            f.write(b"half a checkpoint")
        print(begun.files[0].path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_pod_killed_mid_save_leaves_nothing_listed(daemon: Daemon, job: str) -> None:
    data = publish(daemon, f"csi-{job}", "team-a", job)
    with pytest.raises(AssertionError, match="the pod failed"):
        run_in_pod(daemon, data, KILLED_SCRIPT, job)
    sessions = data / ".cairn" / "sessions"
    assert len(list(sessions.iterdir())) == 1, "the save was staged inside the volume"
    with daemon.client(tenant="team-a") as host:
        assert host.list_steps(job) == []
        # The next save of that shard finds its writer dead and takes over;
        # the dead session's files leave the volume.
        host.save(job, 5, 0, {"w": np.zeros(4, dtype=np.uint8)})
        assert [s.step for s in host.list_steps(job)] == [5]
    assert list(sessions.iterdir()) == []
