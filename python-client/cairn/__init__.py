"""Cairn: checkpoints for ML training through the node's Cairn daemon.

>>> import cairn
>>> with cairn.Client() as client:                      # doctest: +SKIP
...     client.save("my-job", step=100, rank=0, tensors={"w": weights})
...     restored = client.restore("my-job")             # newest complete step
...     restored["w"]                                   # read-only numpy view

``cairn.torch`` holds the PyTorch Distributed Checkpoint writer and reader,
``cairn.jax`` the JAX pytree functions; both are imported on demand so
``import cairn`` needs neither framework.
"""

from cairn import errors
from cairn.client import (
    DEFAULT_SOCKET,
    Client,
    RestoredShard,
    SaveHandle,
    SaveResult,
    ShardState,
    ShardStatus,
    StepInfo,
    Tier,
)
from cairn.errors import (
    Aborted,
    AlreadyExists,
    CairnError,
    DaemonUnavailable,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TierUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "Aborted",
    "AlreadyExists",
    "CairnError",
    "Client",
    "DaemonUnavailable",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RestoredShard",
    "SaveHandle",
    "SaveResult",
    "ShardState",
    "ShardStatus",
    "StepInfo",
    "Tier",
    "TierUnavailable",
    "errors",
]
