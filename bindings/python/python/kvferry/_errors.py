"""kvferry's exceptions: one class per range of error codes, each carrying the stable code."""

from __future__ import annotations

import builtins


class KvferryError(Exception):
    """A kvferry failure. ``code`` is kvferry's stable error code, ``code_name`` its name."""

    code: int
    code_name: str

    def __init__(self, message: str, code: int = 0, code_name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name

    def __str__(self) -> str:
        return f"[{self.code_name} {self.code}] {super().__str__()}"

    def __reduce__(self):  # keeps code and name through pickling (multiprocessing)
        return (type(self), (self.args[0], self.code, self.code_name))


class InvalidArgumentError(KvferryError, ValueError):
    """Code 1: kvferry refused an argument (a ValueError too)."""


class UnsupportedError(KvferryError):
    """Code 2: this build or this machine cannot do it."""


class RegistrationError(KvferryError):
    """1xx: memory and devices (allocation, pinning, GPU drivers)."""


class LayoutError(KvferryError):
    """2xx: KV layout arithmetic."""


class MetadataError(KvferryError):
    """3xx: a peer's metadata is truncated, corrupt or of another version."""


class DescriptorError(KvferryError):
    """4xx: regions, indices and peers of a transfer request."""


class TransferError(KvferryError):
    """5xx: a transfer failed (peer unreachable or gone, refused remotely, ...)."""


class TransferTimeoutError(TransferError, builtins.TimeoutError):
    """Code 500: a transfer reached its deadline (a builtins.TimeoutError too)."""


class TierError(KvferryError):
    """6xx: the tier store."""


_BY_RANGE = {
    1: RegistrationError,
    2: LayoutError,
    3: MetadataError,
    4: DescriptorError,
    5: TransferError,
    6: TierError,
}
_BY_CODE = {1: InvalidArgumentError, 2: UnsupportedError, 500: TransferTimeoutError}


def error_for(code: int, code_name: str, message: str) -> KvferryError:
    """The exception for a kvferry error code; codes of other ranges get KvferryError itself."""
    cls = _BY_CODE.get(code) or _BY_RANGE.get(code // 100, KvferryError)
    return cls(message, code, code_name)
