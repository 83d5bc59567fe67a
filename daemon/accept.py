"""Accepting on a listening socket when the process runs out of file descriptors.

When accept() fails with EMFILE, ENFILE, ENOBUFS or ENOMEM the pending connection stays in
the backlog and the socket stays readable: a selector loop that retries at once spins at full
CPU and logs each failure. `AcceptGate` turns such a failure into a pause (the caller stops
watching the socket) that doubles from `first` to `longest` seconds while the failure lasts,
and logs each kind of failure once. Connections that vanish before accept() (ECONNABORTED,
EPROTO, EPERM from a firewall) are ordinary: the caller drops them and goes on.
"""
from __future__ import annotations

import errno
import logging
import time
from collections import Counter

# the connection went away between the SYN and accept(): nothing to do but take the next one
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})


class AcceptGate:
    def __init__(self, what: str, log: logging.Logger, first: float = 0.05, longest: float = 1.0) -> None:
        self.what = what
        self.log = log
        self.first, self.longest = first, longest
        self.errors: Counter[str] = Counter()     # errno name -> failed accepts
        self._delay = first
        self._failing = False
        self._logged: set[str] = set()
        self.resume_at = 0.0                      # time.monotonic() when accepting may start again

    def failed(self, exc: OSError) -> float:
        """Count and maybe log an accept() failure; returns the seconds to stop accepting."""
        kind = errno.errorcode.get(exc.errno or 0, "error")
        self.errors[kind] += 1
        if kind not in self._logged:
            self._logged.add(kind)
            self.log.warning("accept on %s failed: %s; pausing new connections and retrying with backoff "
                             "(up to %gs; logged once per kind)", self.what, exc, self.longest)
        pause = self._delay if self._failing else self.first
        self._failing = True
        self._delay = min(self.longest, pause * 2)
        self.resume_at = time.monotonic() + pause
        return pause

    def succeeded(self) -> None:
        if self._failing:
            self._failing = False
            self._delay = self.first
            if "recovered" not in self._logged:
                self._logged.add("recovered")
                self.log.info("accept on %s works again (logged once)", self.what)
