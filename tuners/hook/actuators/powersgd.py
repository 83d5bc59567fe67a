"""PowerSGD gradient compression (Vogels et al., 2019) for one DDP bucket, with error feedback.

Each gradient matrix M (n x m, a parameter's gradient with its first dimension kept) of this
rank, plus the error the last compression left, is replaced by the rank-r approximation P Q^T
that all ranks agree on: P = M Q, all-reduced and orthonormalised; Q = M^T P, all-reduced; the
part the approximation missed is kept and added back next step. Vectors and matrices too small to
gain (r (n + m) >= n m) go uncompressed, in one all-reduce. Q is warm-started from the last step.

Written here rather than taken from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook:
its state compresses only from `start_powerSGD_iter` (1000 by default, at least 2 with error
feedback), counted from the hook's registration, so a trial switched on later would have to
rebuild the state to measure compression at all; the issue's author saw it fail under gloo (an
EnforceNotMet size mismatch), which torch 2.13 on CPU did not reproduce here (two gloo ranks, a
two-layer MLP, 5 steps, /tmp check on 2026-12-01). This one compresses from the first step after
a switch, counts the bytes it sends, and also runs on hook.accumulate's own flat buckets;
`reset()` forgets errors and Q, so every switch starts clean on every rank.
"""
from __future__ import annotations

from typing import Any


class PowerSGD:
    def __init__(self, rank: int = 1, seed: int = 0) -> None:
        self.rank = rank
        self.seed = seed
        self.state: dict[int, dict[str, Any]] = {}     # bucket index -> Qs and errors of its tensors

    def reset(self, rank: int | None = None) -> None:
        if rank is not None:
            self.rank = rank
        self.state.clear()

    def __call__(self, bucket: Any, group: Any, world: int) -> tuple[Any, int]:
        """Compress, all-reduce and decompress the bucket in place; returns (buffer, bytes sent)."""
        import torch
        import torch.distributed as dist
        buf = bucket.buffer()
        grads = bucket.gradients()
        st = self.state.setdefault(bucket.index(), {"Q": {}, "err": {}})
        r = self.rank
        high, low = [], []
        for i, g in enumerate(grads):
            if g.ndim > 1:
                n, m = g.shape[0], g.numel() // g.shape[0]
                if r * (n + m) < n * m:
                    high.append((i, g.view(n, m)))
                    continue
            low.append(g)
        sent = 0
        if low:
            flat = torch.cat([g.reshape(-1) for g in low])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for g in low:
                k = g.numel()
                g.copy_(flat[offset:offset + k].view_as(g))
                offset += k
            sent += flat.numel() * flat.element_size()
        if high:
            for i, M in high:
                err = st["err"].get(i)
                if err is not None:
                    M.add_(err)
                if i not in st["Q"]:
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + bucket.index() * 10_007 + i)
                    q = torch.randn(M.shape[1], r, generator=gen, dtype=torch.float32)
                    st["Q"][i] = torch.linalg.qr(q).Q.to(M.dtype).to(M.device)
            Ps = [M @ st["Q"][i] for i, M in high]
            flat = torch.cat([p.reshape(-1) for p in Ps])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            sent += flat.numel() * flat.element_size()
            offset = 0
            for k, p in enumerate(Ps):
                Ps[k] = torch.linalg.qr(flat[offset:offset + p.numel()].view_as(p)).Q
                offset += p.numel()
            Qs = [M.t() @ P for (_, M), P in zip(high, Ps)]
            flat = torch.cat([q.reshape(-1) for q in Qs])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            sent += flat.numel() * flat.element_size()
            offset = 0
            for (i, M), P, q in zip(high, Ps, Qs):
                Q = flat[offset:offset + q.numel()].view_as(q)
                offset += q.numel()
                approx = P @ Q.t()
                st["err"][i] = M - approx        # this rank's own share the approximation missed
                st["Q"][i] = Q.clone()
                M.copy_(approx)
        return buf, sent
