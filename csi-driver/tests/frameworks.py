"""Real framework code for csi-driver/tests/ingest.rs (run with the
repository's .venv: torch, jax, orbax-checkpoint).

save <orbax_dir> <dcp_dir>:    Orbax CheckpointManager saves steps 1 and 2 into
                               <orbax_dir>; DCP saves step 5 into <dcp_dir>/step_5.
restore <orbax_dir> <dcp_dir>: Orbax restores the latest step (must be 2) from
                               <orbax_dir>; DCP loads <dcp_dir>/step_5; both are
                               compared with what was saved. Paths must be absolute.
"""
import os
import sys

import numpy as np


def orbax_tree(step):
    # 0-d arrays, not numpy scalars: Orbax refuses scalars in a pytree.
    return {
        "w": np.arange(256 * 256, dtype=np.float32).reshape(256, 256) * step,
        "b": np.array(step * 0.5, dtype=np.float32),
        "n": np.array(step, dtype=np.int32),
    }


def dcp_state(step):
    import torch

    return {
        "weight": torch.arange(128 * 128, dtype=torch.float32).reshape(128, 128) + step,
        "bias": torch.full((7,), float(step)),
    }


def main():
    mode, orbax_dir, dcp_dir = sys.argv[1:4]
    import orbax.checkpoint as ocp
    import torch
    import torch.distributed.checkpoint as dcp

    step_dir = os.path.join(dcp_dir, "step_5")
    if mode == "save":
        manager = ocp.CheckpointManager(orbax_dir)
        for step in (1, 2):
            saved = manager.save(step, args=ocp.args.StandardSave(orbax_tree(step)))
            assert saved, f"Orbax did not save step {step}: {manager.all_steps()}"
            manager.wait_until_finished()
        manager.close()
        dcp.save(dcp_state(5), storage_writer=dcp.FileSystemWriter(step_dir))
        print("saved")
    elif mode == "restore":
        manager = ocp.CheckpointManager(orbax_dir)
        latest = manager.latest_step()
        assert latest == 2, f"latest step {latest}, all: {manager.all_steps()}"
        restored = manager.restore(2, args=ocp.args.StandardRestore(orbax_tree(0)))
        for key, want in orbax_tree(2).items():
            got = np.asarray(restored[key])
            assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape)
            np.testing.assert_array_equal(got, want)
        manager.close()
        state = {k: torch.zeros_like(v) for k, v in dcp_state(0).items()}
        dcp.load(state, storage_reader=dcp.FileSystemReader(step_dir))
        for key, want in dcp_state(5).items():
            assert torch.equal(state[key], want), key
        print("restored")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
