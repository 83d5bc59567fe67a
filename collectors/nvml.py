"""One gate for every NVML call.

`pynvml` (from nvidia-ml-py) is imported lazily so a host without it still runs the daemon.
A function the driver lacks or refuses (NotSupported, FunctionNotFound, NoPermission) is
logged once per device and never called again; errors that mean the driver or the device is
gone are raised so the collector fails this sample and re-initialises later; anything else
is counted and the value is left out (None), never turned into 0.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from looptune.collectors.base import CollectorUnavailable

log = logging.getLogger("looptune.nvml")

INSTALL_HINT = "pip install nvidia-ml-py"

# error names (pynvml class suffixes) after which a function is not tried again on that device
_SKIP_FOREVER = ("NotSupported", "FunctionNotFound", "NoPermission", "InvalidArgument")
# errors that make the whole sample fail: the library, the driver or the device went away
_FATAL = ("Uninitialized", "DriverNotLoaded", "LibraryNotFound", "GpuIsLost", "LibRmVersionMismatch",
          "ResetRequired")


class NVMLUnavailable(CollectorUnavailable):
    """NVML cannot be used on this host; the message says why and what to do."""


def error_name(exc: BaseException) -> str:
    return type(exc).__name__.removeprefix("NVMLError_")


class NVML:
    """Wraps the pynvml module: init/shutdown, and `query()` with remembered unsupported calls."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self.unsupported: set[tuple[str, Any]] = set()   # (function, device key)
        self.soft_errors = 0                            # counted, value left out

    @property
    def module(self) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NVMLUnavailable(f"the pynvml module is missing ({exc}); {INSTALL_HINT}") from None
        return self._module

    def init(self) -> None:
        nv = self.module
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            name = error_name(exc)
            why = {
                "LibraryNotFound": "the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver here",
                "DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
                "NoPermission": "no permission to open the NVIDIA devices (/dev/nvidia*)",
                "LibRmVersionMismatch": "the NVML library and the kernel driver versions differ (reboot pending?)",
            }.get(name, f"nvmlInit failed: {exc}")
            raise NVMLUnavailable(why) from None

    def shutdown(self) -> None:
        try:
            self.module.nvmlShutdown()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass

    def is_fatal(self, exc: BaseException) -> bool:
        return error_name(exc) in _FATAL

    def query(self, func: str, key: Any, *args: Any, default: Any = None,
              convert: Callable[[Any], Any] | None = None) -> Any:
        """Call `pynvml.<func>(*args)`; `key` names the device for the remembered-unsupported set."""
        if (func, key) in self.unsupported:
            return default
        nv = self.module
        fn = getattr(nv, func, None)
        if fn is None:   # an older nvidia-ml-py without this wrapper
            self._skip(func, key, "not in this pynvml version")
            return default
        try:
            value = fn(*args)
        except getattr(nv, "NVMLLibraryMismatchError", ()) as exc:
            # a newer versioned entry point the installed driver lacks; not an NVMLError
            self._skip(func, key, str(exc) or "driver lacks this entry point")
            return default
        except nv.NVMLError as exc:
            name = error_name(exc)
            if name in _FATAL:
                raise
            if name in _SKIP_FOREVER:
                self._skip(func, key, str(exc))
            else:
                self.soft_errors += 1
                log.debug("%s on GPU %s: %s", func, key, exc)
            return default
        return convert(value) if convert else value

    def _skip(self, func: str, key: Any, why: str) -> None:
        self.unsupported.add((func, key))
        log.info("NVML %s on GPU %s: %s; not asked again", func, key, why)
