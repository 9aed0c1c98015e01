"""
AdamW with 8-bit blockwise states (Dettmers et al. 2022, arXiv:2110.02861), optionally paged.

    m <- b1 m + (1 - b1) g            stored as 8-bit codes of the signed dynamic map, blocks of 256
    v <- b2 v + (1 - b2) g^2          stored with the unsigned dynamic map, blocks of 256
    p <- p (1 - lr wd) - lr/(1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each step dequantizes a parameter's states to fp32, updates, and requantizes: 2 bytes per parameter
plus 8 bytes of absmax per 256, instead of AdamW's 8. Tensors under 4096 elements keep fp32 states
(their share of memory is negligible and small tensors are often sensitive). The arithmetic follows
bitsandbytes' CPU AdamW8bit op for op; we round to the nearest code (see tests/test_optim.py).

paged=True keeps the states in (pinned) host memory and brings them to the GPU one parameter at a
time, the next one prefetched on a side stream, so the optimizer needs device memory for one
parameter's states at most. On CPU it changes nothing.

    from optim import AdamW8bit
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, paged=True)
"""
import math

import torch

from nf4 import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dequantize_blockwise, quantize_blockwise

BLOCK = 256


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 paged: bool = False, min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paged, self.min_8bit_size = paged, min_8bit_size

    def _home(self, p):
        """Where a parameter's states live between steps."""
        return torch.device("cpu") if (self.paged and p.is_cuda) else p.device

    def _init_state(self, p):
        st, home = self.state[p], self._home(p)
        st["step"] = 0
        pin = self.paged and p.is_cuda
        zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=home, pin_memory=pin)
        if p.numel() < self.min_8bit_size:
            st["exp_avg"], st["exp_avg_sq"] = zeros(p.shape, torch.float32), zeros(p.shape, torch.float32)
        else:
            blocks = -(-p.numel() // BLOCK)
            st["m_codes"], st["v_codes"] = zeros(p.shape, torch.uint8), zeros(p.shape, torch.uint8)
            st["m_absmax"], st["v_absmax"] = zeros(blocks, torch.float32), zeros(blocks, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for _, p in work:
            if not self.state[p]:
                self._init_state(p)
        paging = self.paged and any(p.is_cuda for _, p in work)
        device = work[0][1].device if paging else None
        side = torch.cuda.Stream(device=device) if paging else None
        fetch = lambda p: self._fetch(p, side)
        nxt = fetch(work[0][1]) if work else None
        for i, (group, p) in enumerate(work):
            states = nxt
            if paging:
                torch.cuda.current_stream(device).wait_stream(side)
                for t in states.values():
                    t.record_stream(torch.cuda.current_stream(device))
            # Prefetch the next parameter's states while this one computes.
            nxt = fetch(work[i + 1][1]) if i + 1 < len(work) else None
            self._update(group, p, states)
            if paging:
                for k, t in states.items():
                    self.state[p][k].copy_(t, non_blocking=True)
        if paging:
            torch.cuda.current_stream(device).synchronize()
        return loss

    def _fetch(self, p, side):
        st = self.state[p]
        keys = [k for k in st if k != "step"]
        if side is None or not p.is_cuda:
            return {k: st[k] for k in keys}
        side.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(side):
            return {k: st[k].to(p.device, non_blocking=True) for k in keys}

    def _update(self, group, p, s):
        st = self.state[p]
        st["step"] += 1
        t, lr, wd, eps = st["step"], group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        g = p.grad.float()
        eight_bit = "m_codes" in s
        if eight_bit:
            m = dequantize_blockwise(s["m_codes"], s["m_absmax"], DYNAMIC_SIGNED, BLOCK)
            v = dequantize_blockwise(s["v_codes"], s["v_absmax"], DYNAMIC_UNSIGNED, BLOCK)
        else:
            m, v = s["exp_avg"], s["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        pf = p.float()
        if wd > 0:
            pf.mul_(1 - lr * wd)   # decoupled weight decay (AdamW), before the Adam step
        if eight_bit:
            pf.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-lr / c1)
            s["m_codes"][...], s["m_absmax"][...] = quantize_blockwise(m, DYNAMIC_SIGNED, BLOCK)
            s["v_codes"][...], s["v_absmax"][...] = quantize_blockwise(v, DYNAMIC_UNSIGNED, BLOCK)
        else:
            # bitsandbytes' 32-bit kernel folds the bias corrections into the step size; same here.
            pf.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
        if pf is not p:
            p.copy_(pf)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t))

    def load_state_dict(self, state_dict):
        # torch casts every state tensor to its parameter's dtype: the uint8 codes would come back as
        # fp32, four times the memory. Give each tensor its saved dtype back, and paged states their
        # place in (pinned) host memory.
        saved = {int(i): {k: v.dtype for k, v in st.items() if torch.is_tensor(v)} for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]   # state_dict numbers them in this order
        for i, dtypes in saved.items():
            p, st = params[i], self.state[params[i]]
            for k, dt in dtypes.items():
                t = st[k].to(self._home(p), dt)
                st[k] = t.pin_memory() if (self.paged and p.is_cuda) else t
