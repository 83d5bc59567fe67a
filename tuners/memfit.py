"""How much device memory a micro-batch needs, learned from the micro-batches that ran.

Pure Python (the hook feeds it numbers read from torch.cuda). Size is counted in elements of
the split tensors, not rows, so a batch padded to a longer sample counts as bigger. The extra
memory of a micro-batch is its peak allocation minus what stays allocated after it (parameters,
gradients, optimizer state): activations and workspaces. Real curves are not straight: the
prediction goes on from the largest size that ran with the smaller of the last two local slopes
(a curve bending up shows in them; a one-off step, a kernel's bigger workspace, does not become
a slope), never extrapolates past 2x the largest that ran, keeps a margin, stays below any size
that ran out of memory, and after such an error creeps up 5% at a time.
"""
from __future__ import annotations

MARGIN = 0.03          # of the room: the caching allocator's rounding and fragmentation
GROWTH = 2.0           # at most this many times the largest size that ran
HEADROOM = 0.10        # below a size that ran out of memory after it had fit (a bigger input)
SETTLE = 0.025         # between a size that ran and one that failed: stop when the next is this close
CREEP = 0.05           # after an out-of-memory error: grow by this much at a time


class MemoryFit:
    def __init__(self) -> None:
        self.points: dict[int, int] = {}     # elements -> the largest extra memory seen at that size
        self.failed: int | None = None       # smallest size that ran out of memory
        self.cap: int | None = None          # bound after an out-of-memory error at a size that had fit

    def ran(self, size: int, extra: int) -> None:
        if size > 0:
            self.points[size] = max(self.points.get(size, 0), max(0, int(extra)))

    def oom(self, size: int) -> None:
        largest_ok = max(self.points, default=0)
        if size <= largest_ok:
            # it fit before: a bigger input or less memory now; stay clear of it with headroom
            bound = int(size * (1 - HEADROOM))
            self.cap = bound if self.cap is None else min(self.cap, bound)
            for e in [e for e in self.points if e > bound]:
                del self.points[e]     # sizes above the bound no longer prove anything
        self.failed = size if self.failed is None else min(self.failed, size)

    @property
    def largest_ok(self) -> int:
        return max(self.points, default=0)

    def largest(self, room: float) -> int | None:
        """The largest size predicted to fit in `room` bytes above what stays allocated; None
        before any micro-batch ran."""
        if not self.points:
            return None
        pts = sorted(self.points.items())[-3:]
        e2, v2 = pts[-1]
        # the smaller of the last two local slopes, from the largest size that ran: a step (a kernel
        # taking a bigger workspace) between two sizes is counted once, not extrapolated as a slope
        slopes = [(vb - va) / (eb - ea) for (ea, va), (eb, vb) in zip(pts, pts[1:]) if vb > va]
        k = min(slopes) if slopes else v2 / e2
        budget = room * (1 - MARGIN)
        size = e2 + (budget - v2) / k if k > 0 else GROWTH * e2
        size = min(size, GROWTH * e2)
        if self.failed is not None and size >= self.failed:
            ok = self.largest_ok
            # between what ran and what did not, the line missed a jump: creep up from what ran
            # (never past half the gap), so a next error, if any, is the last one
            size = min((ok + self.failed) / 2, ok * (1 + CREEP)) if self.failed > ok else self.failed * (1 - HEADROOM)
            if size < ok * (1 + SETTLE):
                size = ok        # a few percent more is not worth another out-of-memory error
        if self.cap is not None:
            size = min(size, self.cap)
        return max(0, int(size))
