"""
AdamW with 8-bit blockwise states (Dettmers et al. 2022, arXiv:2110.02861), optionally paged.

    m <- b1 m + (1 - b1) g            stored as 8-bit codes of the signed dynamic map, blocks of 256
    v <- b2 v + (1 - b2) g^2          stored with the unsigned dynamic map, blocks of 256
    p <- p (1 - lr wd) - lr/(1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each step dequantizes a parameter's states to fp32, updates, and requantizes: 2 bytes per parameter
plus 8 bytes of absmax per 256, instead of AdamW's 8. Tensors under 4096 elements keep fp32 states
(their share of memory is negligible and small tensors are often sensitive). The arithmetic follows
bitsandbytes' CPU AdamW8bit op for op; we round to the nearest code (see tests/test_optim.py).

Every parameter's states have a slot in a few flat buffers (8-bit codes padded to whole blocks, so the
blocks are each parameter's own; fp32 states), and a step updates runs of consecutive parameters, up to
CHUNK elements, as one tensor: a few dozen operations per run instead of per tensor (the default model's
adapters are 420 tensors: 3 runs).

paged=True keeps the buffers in (pinned) host memory and brings them to the GPU a run at a time, the
next one prefetched on a side stream: a handful of copies per run, and device memory for two runs'
states at most. On CPU it changes nothing.

    from optim import AdamW8bit
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, paged=True)
"""
import math

import torch

from fsdp import local
from nf4 import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dequantize_blockwise, quantize_blockwise

BLOCK = 256
CHUNK = 1 << 21   # elements per run: its fp32 working copies (gradient, weight, m, v) stay ~40 MB
FP32 = ("exp_avg", "exp_avg_sq")


def pack_runs(items, length, joins=lambda a, b: True) -> list[list]:
    """Consecutive items in runs of at most CHUNK elements in all (a longer item is a run of its own);
    None ends a run, and so does an item that `joins(previous, item)` refuses."""
    runs, size = [], 0
    for i, item in enumerate(items):
        if item is None:
            continue
        if i and items[i - 1] is not None and size + length(item) <= CHUNK and joins(items[i - 1], item):
            runs[-1].append(item)
            size += length(item)
        else:
            runs.append([item])
            size = length(item)
    return runs


def slot(numel: int, min_8bit_size: int = 4096, kind: str | None = None) -> tuple[str, int]:
    """A parameter's kind of states (by its numel, unless given) and its slot length in the flat buffers
    for `numel` elements (8-bit: whole blocks)."""
    kind = kind or ("8bit" if numel >= min_8bit_size else "32bit")
    return kind, (-(-numel // BLOCK) * BLOCK if kind == "8bit" else numel)


def slot_bytes(kind: str, n: int) -> int:
    return 2 * n + 8 * (n // BLOCK) if kind == "8bit" else 8 * n


def device_state_bytes(numels, min_8bit_size: int = 4096, paged: bool = False) -> int:
    """Optimizer-state bytes on the training device for parameters of these sizes (one group, every one
    with a gradient): all of them; paged, the two runs in flight at once (one updating, one prefetched)."""
    slots = [slot(n, min_8bit_size) for n in numels]
    if not paged:
        return sum(slot_bytes(*s) for s in slots)
    per = [slot_bytes(kind, sum(n for _, n in run)) for kind in ("8bit", "32bit")
           for run in pack_runs([s for s in slots if s[0] == kind], lambda s: s[1])]
    return max([a + b for a, b in zip(per, per[1:])] + per[:1], default=0)


def fp32_states(st: dict) -> dict:
    """A parameter's saved Adam states as fp32 exp_avg and exp_avg_sq, dequantized if they are 8-bit codes (of
    AdamW8bit or torch's AdamW, whose state_dict names them so): what --resume re-cuts for another world size.
    AdamW8bit.load_state_dict takes them back in this form too, quantizing them into its 8-bit slots."""
    if "m_codes" not in st:
        return {k: st[k].float() for k in FP32}
    codes = lambda k: st[k].to(torch.uint8)   # load_state_dict may have cast them to float
    return dict(exp_avg=dequantize_blockwise(codes("m_codes"), st["m_absmax"].float(), DYNAMIC_SIGNED, BLOCK),
                exp_avg_sq=dequantize_blockwise(codes("v_codes"), st["v_absmax"].float(), DYNAMIC_UNSIGNED, BLOCK))


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 paged: bool = False, min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paged, self.min_8bit_size = paged, min_8bit_size
        self.flat, self.slots = {}, {}   # kind -> name -> flat buffer; parameter -> (kind, offset, slot length)

    def _home(self, p):
        """Where a parameter's states live between steps."""
        return torch.device("cpu") if (self.paged and p.is_cuda) else p.device

    def _build(self):
        """A slot for every parameter in the flat buffers, its states (zeros, or those loaded) moved there;
        self.state[p] then holds views of its slot, shaped as they would be per tensor."""
        params = [p for g in self.param_groups for p in g["params"]]
        homes = {self._home(p) for p in params}
        if len(homes) > 1:
            raise ValueError(f"AdamW8bit: parameters on several devices ({sorted(map(str, homes))}); use one optimizer per device")
        home = homes.pop() if homes else torch.device("cpu")
        pin = self.paged and any(p.is_cuda for p in params)
        size = {"8bit": 0, "32bit": 0}
        for p in params:
            kind = slot(p.numel(), self.min_8bit_size)[0]   # the whole tensor's size decides, on every rank alike
            _, n = slot(local(p).numel(), kind=kind)         # for this rank's part of it under --fsdp
            self.slots[p] = (kind, size[kind], n)
            size[kind] += n
        zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=home, pin_memory=pin)
        self.flat = {"8bit": dict(m_codes=zeros(size["8bit"], torch.uint8), v_codes=zeros(size["8bit"], torch.uint8),
                                  m_absmax=zeros(size["8bit"] // BLOCK, torch.float32),
                                  v_absmax=zeros(size["8bit"] // BLOCK, torch.float32)),
                     "32bit": dict(exp_avg=zeros(size["32bit"], torch.float32), exp_avg_sq=zeros(size["32bit"], torch.float32))}
        for p in params:
            st, old = self.state[p], dict(self.state[p])
            st["step"] = old.get("step", 0)
            if self.slots[p][0] == "8bit" and "exp_avg" in old:   # fp32 states re-cut for another world size
                old["m_codes"], old["m_absmax"] = quantize_blockwise(old.pop("exp_avg"), DYNAMIC_SIGNED, BLOCK)
                old["v_codes"], old["v_absmax"] = quantize_blockwise(old.pop("exp_avg_sq"), DYNAMIC_UNSIGNED, BLOCK)
            for k, view in self._views(p).items():
                if k in old:
                    view.copy_(old[k].reshape(view.shape))
                st[k] = view

    def _views(self, p) -> dict:
        kind, o, n = self.slots[p]
        f, p = self.flat[kind], local(p)   # under --fsdp: this rank's shard
        if kind == "32bit":
            return {k: f[k][o:o + n].view(p.shape) for k in FP32}
        blocks = slice(o // BLOCK, (o + n) // BLOCK)
        return dict(m_codes=f["m_codes"][o:o + p.numel()].view(p.shape), v_codes=f["v_codes"][o:o + p.numel()].view(p.shape),
                    m_absmax=f["m_absmax"][blocks], v_absmax=f["v_absmax"][blocks])

    def _runs(self):
        """(group, kind, params): parameters of consecutive slots that have gradients and the same step
        count, up to CHUNK elements. Runs never cross groups."""
        runs = []
        for group in self.param_groups:
            for kind in ("8bit", "32bit"):
                ps = [p if p.grad is not None else None for p in group["params"] if self.slots[p][0] == kind]
                same_step = lambda p, q: self.state[p]["step"] == self.state[q]["step"]
                runs += [(group, kind, run) for run in pack_runs(ps, lambda p: self.slots[p][2], same_step)]
        return runs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.slots:
            self._build()
        runs = self._runs()
        paging = self.paged and any(ps[0].is_cuda for _, _, ps in runs)
        device = runs[0][2][0].device if paging else None
        side = torch.cuda.Stream(device=device) if paging else None
        nxt = self._fetch(runs[0], side) if runs else None
        for i, run in enumerate(runs):
            states = nxt
            if paging:
                torch.cuda.current_stream(device).wait_stream(side)
                for t in states.values():
                    t.record_stream(torch.cuda.current_stream(device))
            # Prefetch the next run's states while this one computes.
            nxt = self._fetch(runs[i + 1], side) if i + 1 < len(runs) else None
            self._update(*run, states)
            if paging:
                for k, t in self._slice(run).items():
                    t.copy_(states[k], non_blocking=True)
        if paging:
            torch.cuda.current_stream(device).synchronize()
        return loss

    def _slice(self, run) -> dict:
        """The run's part of each flat buffer (a view: its slots are consecutive)."""
        _, kind, ps = run
        o, end = self.slots[ps[0]][1], self.slots[ps[-1]][1] + self.slots[ps[-1]][2]
        return {k: (t[o // BLOCK:end // BLOCK] if k.endswith("absmax") else t[o:end]) for k, t in self.flat[kind].items()}

    def _fetch(self, run, side):
        states = self._slice(run)
        p = run[2][0]
        if side is None or not p.is_cuda:
            return states
        side.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(side):
            return {k: t.to(p.device, non_blocking=True) for k, t in states.items()}

    def _flatten(self, tensors, params) -> torch.Tensor:
        """fp32 (run length,) of the run's tensors, each zero-padded to its parameter's slot; a lone fp32 tensor
        that fills its slot is its own view (updated in place: no copy)."""
        pads = [self.slots[p][2] - t.numel() for t, p in zip(tensors, params)]
        if len(tensors) == 1 and not pads[0] and tensors[0].dtype == torch.float32 and tensors[0].is_contiguous():
            return tensors[0].view(-1)
        parts = []
        for t, pad in zip(tensors, pads):
            parts += [t.reshape(-1).float()] + ([t.new_zeros(pad, dtype=torch.float32)] if pad else [])
        return torch.cat(parts)

    def _update(self, group, kind, params, s):
        t = self.state[params[0]]["step"] + 1
        for p in params:
            self.state[p]["step"] = t
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        shards = [local(p) for p in params]   # under --fsdp: this rank's parts; else the parameters
        g = self._flatten([local(p.grad) for p in params], params)
        pf = self._flatten(shards, params)
        eight_bit = kind == "8bit"
        if eight_bit:
            m = dequantize_blockwise(s["m_codes"], s["m_absmax"], DYNAMIC_SIGNED, BLOCK)
            v = dequantize_blockwise(s["v_codes"], s["v_absmax"], DYNAMIC_UNSIGNED, BLOCK)
        else:
            m, v = s["exp_avg"], s["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        if wd > 0:
            pf.mul_(1 - lr * wd)   # decoupled weight decay (AdamW), before the Adam step
        if eight_bit:
            pf.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
            s["m_codes"][...], s["m_absmax"][...] = quantize_blockwise(m, DYNAMIC_SIGNED, BLOCK)
            s["v_codes"][...], s["v_absmax"][...] = quantize_blockwise(v, DYNAMIC_UNSIGNED, BLOCK)
        else:
            # bitsandbytes' 32-bit kernel folds the bias corrections into the step size; same here.
            pf.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
        if pf.data_ptr() != shards[0].data_ptr():   # a copy: put each parameter's part back, in one call
            o0 = self.slots[params[0]][1]
            parts = [pf[self.slots[p][1] - o0:][:x.numel()].view(x.shape) for p, x in zip(params, shards)]
            torch._foreach_copy_(shards, parts)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.flat.values() for t in f.values())

    def state_dict(self):
        # Each parameter's states as tensors of their own: the slot views share the flat buffers' storage,
        # which safetensors (and any reader) would see as one tensor aliased many times.
        sd = super().state_dict()
        sd["state"] = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        # torch casts every state tensor to its parameter's dtype: the uint8 codes come back as fp32 (the
        # same integers). _build copies each into its slot of the flat buffers, which have the states' own
        # dtypes (and live in pinned host memory when paged): four times the memory for a moment, not for good.
        super().load_state_dict(state_dict)
        self._build()
