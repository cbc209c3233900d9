"""Exceptions raised by the Cairn client.

Every error the daemon returns becomes one subclass of :class:`CairnError`,
chosen by the gRPC status code, with the daemon's message kept verbatim (it
names the field or the object at fault). Where a built-in exception means the
same thing the class also derives from it, so ``except ValueError`` catches a
bad name and ``except TimeoutError`` a deadline.
"""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "CairnError",
    "DaemonUnavailable",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
]


class CairnError(Exception):
    """Base class of every error raised by the Cairn client."""

    #: The gRPC status code the daemon answered with, or None for errors the
    #: client found on its own.
    code: grpc.StatusCode | None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class DaemonUnavailable(CairnError, ConnectionError):
    """The daemon could not be reached; the message names the address tried.

    The client retries such calls for ``Client.retry_for`` seconds first;
    ``retried_for`` says how long it did (None: not retried).
    """

    def __init__(
        self,
        message: str,
        target: str,
        code: grpc.StatusCode | None = None,
        *,
        retried_for: float | None = None,
    ) -> None:
        super().__init__(message, code)
        self.target = target
        self.retried_for = retried_for


class TierUnavailable(CairnError, ConnectionError):
    """The daemon answered, but a tier the answer depends on did not (the
    bucket): "no checkpoint" cannot be told from "cannot see it now"."""


class NotFound(CairnError, LookupError):
    """No such job, step, shard or session."""


class InvalidArgument(CairnError, ValueError):
    """A name, size or other argument was rejected; the message names it."""


class AlreadyExists(CairnError):
    """The shard is already committed: complete steps are immutable."""


class Aborted(CairnError):
    """Another writer holds an open session for the same shard, or a newer
    save (attempt) of the step superseded this one."""


class ResourceExhausted(CairnError):
    """The memory tier has no room for the shard."""


class FailedPrecondition(CairnError):
    """The operation does not fit the current state (e.g. an aborted session)."""


class DataLoss(CairnError):
    """Stored bytes failed verification in every tier that held them."""


class PermissionDenied(CairnError, PermissionError):
    """The caller's identity may not touch that tenant's checkpoints."""


class DeadlineExceeded(CairnError, TimeoutError):
    """The call (or the wait it asked for) ran out of time, or a save or
    restore made no progress for the client's ``stall_timeout``; the message
    names the call, the daemon and how long it waited."""


_BY_CODE: dict[grpc.StatusCode, type[CairnError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(error: grpc.RpcError, target: str, call: str) -> CairnError:
    """Turns a failed gRPC call into the matching :class:`CairnError`.

    ``target`` is the daemon address (for DaemonUnavailable), ``call`` the RPC
    name, which prefixes messages that would otherwise lack context.
    """
    code: grpc.StatusCode | None = None
    details = ""
    if isinstance(error, grpc.Call):
        code = error.code()
        details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return DaemonUnavailable(
            f"cairn daemon unavailable at {target}: {details or 'connection failed'}",
            target,
            code,
        )
    cls = _BY_CODE.get(code, CairnError) if code is not None else CairnError
    if cls is CairnError:
        name = code.name if code is not None else "UNKNOWN"
        return CairnError(f"{call} failed ({name}): {details}", code)
    return cls(details or f"{call} failed ({cls.__name__})", code)
