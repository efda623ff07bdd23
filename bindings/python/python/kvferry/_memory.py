"""What keeps a registered torch tensor's memory in place, and what tells that it moved.

A registration holds the tensor's *storage*, not the tensor: ``tensor.set_(other)`` swaps the
storage under a tensor object, and the registered memory must not be freed (and reused by some
unrelated tensor) while peers can still reach it. Holding the storage does not stop
``storage.resize_()``, which frees the memory of the storage itself; so where torch allows it the
registration also *pins* the storage: its memory is handed to a private storage that owns it and
the user's storage is left with a non-owning, non-resizable view of the same bytes, on which
torch refuses ``resize_`` ("Trying to resize storage that is not resizable"). Deregistering hands
the memory back. Everything else that moves a storage (``share_memory_()``, ``set_`` on the
tensor) is found by ``moved()``, which the binding calls on every use of the registration and
periodically (``_Watcher``); the binding then revokes the registration at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, Optional

log = logging.getLogger("kvferry")


def _can_pin(torch: Any) -> bool:
    # Private torch calls (present since torch 2.3); without them, registrations are only checked.
    return hasattr(torch._C, "_construct_storage_from_data_pointer") and hasattr(
        torch.UntypedStorage, "_swap_data_ptr_"
    )


class TensorKeep:
    """Keeps a tensor's storage (and so its memory) for a registration of ``[addr, addr + length)``."""

    def __init__(self, tensor: Any, addr: int, length: int) -> None:
        import torch

        storage = tensor.untyped_storage()
        self.storage = storage
        self.base = storage.data_ptr()
        self.nbytes = storage.nbytes()
        self.end = addr + length - self.base  # the storage must keep at least this many bytes
        self.addr = addr
        self.tensor = weakref.ref(tensor)
        # The private storage that owns the memory while pinned; None when not pinned.
        self.owner: Optional[Any] = None
        # CUDA memory is only checked: a caching-allocator block lent to a non-owning storage
        # would no longer follow `record_stream`.
        if storage.device.type == "cpu" and storage.resizable() and _can_pin(torch):
            owner = torch._C._construct_storage_from_data_pointer(self.base, storage.device, self.nbytes)
            # Swaps data pointer, size, allocator and resizability: `storage` keeps the bytes but
            # can no longer free or move them; `owner` frees them once released.
            storage._swap_data_ptr_(owner)
            self.owner = owner

    @property
    def pinned(self) -> bool:
        return self.owner is not None

    def moved(self) -> Optional[str]:
        """Why the registered memory is no longer the tensor's; None while it is."""
        ptr, nbytes = self.storage.data_ptr(), self.storage.nbytes()
        if ptr != self.base or nbytes < self.end:
            return (
                f"the tensor's storage moved or shrank (data_ptr {self.base:#x} -> {ptr:#x}, "
                f"{self.nbytes} -> {nbytes} bytes)"
            )
        tensor = self.tensor()
        if tensor is not None and tensor.data_ptr() != self.addr:
            return f"the tensor now points elsewhere (data_ptr {self.addr:#x} -> {tensor.data_ptr():#x}, set_?)"
        return None

    def release(self) -> None:
        """Hand the memory back to the tensor's storage (after deregistration); idempotent."""
        owner, self.owner = self.owner, None
        if owner is None:
            return
        if self.storage.data_ptr() == self.base and self.storage.nbytes() == self.nbytes:
            self.storage._swap_data_ptr_(owner)
        # Otherwise the storage was given other memory (share_memory_, say): `owner` is the only
        # holder of the registered bytes, freed as it goes.


class _Watcher:
    """Checks live tensor registrations every `interval` seconds from a daemon thread."""

    def __init__(self) -> None:
        self.interval = float(os.environ.get("KVFERRY_REGISTRATION_CHECK_INTERVAL", "0.1"))
        self._registrations: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    def add(self, registration: Any) -> None:
        with self._lock:
            self._registrations.add(registration)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="kvferry-registration-check", daemon=True)
                self._thread.start()

    def set_interval(self, seconds: float) -> None:
        """Check every `seconds` (0: never); takes effect at once."""
        self.interval = seconds
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval if self.interval > 0 else None)
            self._wake.clear()
            if self._stopped:
                return
            if self.interval <= 0:
                continue
            with self._lock:
                live = list(self._registrations)
            for registration in live:
                try:
                    registration.check()
                except Exception as e:  # revoked by check(); the owner's next call raises it too
                    log.warning("kvferry: %s", e)
                    with self._lock:
                        self._registrations.discard(registration)
            del live

    def stop(self) -> None:
        """Before the interpreter shuts down: no check may be running while it does."""
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join()

    def _forked(self) -> None:
        # The thread did not survive fork: the child starts its own on its next registration.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


WATCHER = _Watcher()
atexit.register(WATCHER.stop)
os.register_at_fork(after_in_child=WATCHER._forked)
