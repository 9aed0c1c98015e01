"""
LoRA (Hu et al. 2021, arXiv:2106.09685) over any frozen linear: nn.Linear (LoRA) or NF4Linear (QLoRA).

    y = base(x) + s * B(A(dropout(x)))      A: (r, in), Kaiming-uniform;  B: (out, r), zeros
    s = alpha / r   (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023)

B = 0 makes the wrapped model start exactly where the base is. We never form B @ A in forward: two
thin matmuls cost r * (in + out) per token instead of in * out. Adapters are saved and loaded in
peft's file format, so they travel to peft and vLLM and back.

DoRA (Liu et al. 2024, arXiv:2402.09353; use_dora=True) splits each output row of the adapted weight
into a learned length m and a direction:

    y = m / ||W + s B A||_row * (W x + s B A x) + bias      m starts at ||W||_row: the base, exactly

The norm is a constant in backward (the paper's section 4.3, and peft), so nothing of W's size is kept
for it: it is computed from one dense copy of this layer's weight (dequantized, for NF4: QDoRA) that
is freed at once, and cached until A, B or m change.

LoftQ (Li et al. 2023, arXiv:2310.08659; loftq_init) starts A and B from a rank-r SVD of the NF4
error instead, so that NF4(W') + s B A is closer to W than NF4(W) is.

    from lora import apply_lora, merge_lora, save_adapter, load_adapter
    info = apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    save_adapter(model, "runs/x")        # adapter_config.json + adapter_model.safetensors
"""
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from fsdp import full
from nf4 import NF4Linear, dequantize_nf4, quantize_nf4

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, device=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base, self.r, self.alpha, self.use_rslora, self.use_dora = base, r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = device or (base.packed.device if isinstance(base, NF4Linear) else base.weight.device)
        # The adapters are fp32 master weights whatever the base's dtype: they are tiny (r * (in + out)),
        # and bf16 updates of lr * grad ~ 1e-6 would round to nothing. The matmuls run in the input's dtype.
        # Named lora_A / lora_B as in peft, so the file keys map one to one.
        # Drawn on the CPU, then moved: the same seed gives the same adapter on a CPU, a GPU (whose generator
        # draws other numbers) or sharded with --fsdp (drawn over an empty model, on the CPU).
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32)
        # Kaiming-uniform with a = sqrt(5) is nn.Linear's own default init (and peft's): A starts as a
        # random projection of the input, B at zero, so only B moves the output at first.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device), self.lora_B.to(device)
        self.merged = False
        self._norm_cache = None
        # DoRA's magnitude (peft's name and place: `<layer>.lora_magnitude_vector`), fp32 like A and B
        self.lora_magnitude_vector = None
        if use_dora:   # over a base still on the meta device (train.py --fsdp) set by start_magnitude later
            empty = (base.packed if isinstance(base, NF4Linear) else base.weight).is_meta
            self.lora_magnitude_vector = nn.Parameter(torch.empty(base.out_features, device=device) if empty
                                                      else self.weight_norm())

    def _norm_key(self):
        m = getattr(self, "lora_magnitude_vector", None)
        return (self.lora_A.weight._version, self.lora_B.weight._version, None if m is None else m._version, id(self.base))

    @torch.no_grad()
    def start_magnitude(self):
        """DoRA's magnitude set to ||W||_row of the base (the adapter's start: the base exactly). The norm
        cache's key holds the base's id and the magnitude's version, so nothing stale survives this."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def forget_norm(self):
        """Drop the cached row norm. Needed where the versions cannot tell: FSDP2 gathers a step's new A and B
        into the same tensors with their version counters kept."""
        self._norm_cache = None

    def norm_is_cached(self, key=None) -> bool:
        key = self._norm_key() if key is None else key
        return self._norm_cache is not None and self._norm_cache[0] == key and not self.lora_A.weight.is_meta

    @torch.no_grad()
    def weight_norm(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| of each output row, in fp32 (out,). One dense fp32 copy of this layer's weight
        exists while it runs (w, the caller's dequantized NF4 weight, is used up in place if it is fp32);
        the result is kept until A, B or the magnitude change (their versions)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        key = self._norm_key()
        if self.norm_is_cached(key):
            return self._norm_cache[1]
        w = self.dense_base(torch.float32) if w is None else w.float()
        w.addmm_(B.float(), A.float(), alpha=self.scaling)
        norm = torch.linalg.vector_norm(w, dim=1)
        self._norm_cache = (key, norm)
        return norm

    def dense_base(self, dtype=torch.float32) -> torch.Tensor:
        """A fresh dense copy of the base weight (out, in): dequantized for NF4, never the stored tensor."""
        if isinstance(self.base, NF4Linear):
            return dequantize_nf4(self.base.state(), dtype)
        return self.base.weight.detach().to(dtype, copy=True)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        w = None   # QDoRA: one dequantization of the NF4 weight serves the matmul and, right after, the row norm
        if self.use_dora and not self.merged and isinstance(self.base, NF4Linear) and not self.norm_is_cached():
            w = self.base.dequantize()
        y = self.base(x, w) if w is not None else self.base(x)
        if self.merged:
            return y
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        if not self.use_dora:
            return _LoRAAdd.apply(y, x, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
        # DoRA: rescale W x + s B A x row by row. Unlike peft, dropout touches only the adapter's input
        # (as in LoRA): peft runs the base a second time on the dropped-out x, a full extra matmul per
        # layer in training. Without dropout (eval, inference, merging) the two are the same function.
        bias = self.base.bias
        if bias is not None:
            y = y - bias
        y = _LoRAAdd.apply(y, x, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
        return _RowScale.apply(y, self.lora_magnitude_vector, self.weight_norm(w), bias)

    def delta(self) -> torch.Tensor:
        """The dense update s * B @ A (out, in), in fp32; only merging needs it."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The dense weight of this layer once merged, from a base weight w (out, in), in fp32:
        W + s B A, and for DoRA each row rescaled by m / ||W + s B A|| (computed from this w, as peft)."""
        w = w.float() + self.delta()
        if self.use_dora:
            self._row_scale = self.lora_magnitude_vector.detach().float() / torch.linalg.vector_norm(w, dim=1)
            w.mul_(self._row_scale[:, None])
        return w

    @torch.no_grad()
    def merge(self, on_nf4: str | None = None):
        """W <- W + s B A (DoRA: rescaled per row), in place. Idempotent; unmerge() reverses it.

        On an NF4 base the sum cannot be stored in 4 bits without requantizing, which can erase a
        small update. So we refuse unless asked: on_nf4="dequantize" keeps the merged weight in the
        compute dtype (reproduces exactly what was trained), "requantize" rounds it back to NF4."""
        if self.merged:
            return
        if isinstance(self.base, NF4Linear):
            if on_nf4 not in ("dequantize", "requantize"):
                raise ValueError("refusing to merge a LoRA adapter into an NF4 (4-bit) base: reload the base in "
                                 "16-bit and merge there (python merge.py --model BASE --adapter RUN --out DIR), or "
                                 "pass on_nf4='dequantize' / 'requantize' to merge into the dequantized weights")
            q = self.base
            w = self.merged_weight(self.dense_base())
            if on_nf4 == "requantize":
                self.base = NF4Linear.from_weight(w, q.bias, q.compute_dtype, q.block_size, q.double_quant)
            else:
                lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device,
                                dtype=q.compute_dtype)
                lin.weight = nn.Parameter(w.to(q.compute_dtype), requires_grad=False)
                if q.bias is not None:
                    lin.bias = q.bias
                self.base = lin
        else:
            with torch.no_grad():   # add in fp32, round once to the weight's dtype
                w = self.base.weight
                w.copy_(self.merged_weight(w).to(w.dtype))
        self.merged = True

    def unmerge(self):
        if not self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise ValueError("cannot unmerge from a requantized NF4 weight; reload the base")
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() / self._row_scale[:, None] if self.use_dora else w.float()).sub_(self.delta()).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{', dora' if self.use_dora else ''}, "
                f"merged={self.merged}")


def _dropout_mask(x, p: float, seed: int):
    """The keep-mask of inverted dropout (a value is dropped with probability p, rounded to a multiple of
    1/65536), drawn from its own generator: the same seed redraws the same mask in backward, so it is never
    stored. The draw is 64-bit words cut into four 16-bit values r: a generator costs per element it fills,
    so this is ~4x cheaper than torch.rand, which made masks ~15% of a CPU training step.

    A value is kept where r >= t. The mask is a word per element of x's size, all ones where kept and zero
    where dropped, and _drop applies it as a bitwise AND of the bits: on CPUs a comparison's bool result, and
    multiplying by it, go through torch's slow element-by-element cast (several times the AND's time), so the
    comparison is integer arithmetic too: clamp(r, t - 1, t) - t is -1 where dropped and 0 where kept."""
    g = torch.Generator(x.device).manual_seed(seed)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None, generator=g)
    t = min(max(round(p * 65536) - 32768, -32767), 32767)   # at least 1/65536 dropped: t - 1 fits in 16 bits
    keep = words.view(torch.int16)[:x.numel()].view(x.shape).clamp(t - 1, t).sub_(t).bitwise_not_()
    return keep.to(_WORDS[x.element_size()])


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _drop(t: torch.Tensor, keep: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """t with the values _dropout_mask drops zeroed: an AND of its bits with the mask (sign-extended to
    t's element size, where that differs from the mask's)."""
    bits, keep = t.view(_WORDS[t.element_size()]), keep.to(_WORDS[t.element_size()])
    return (bits.bitwise_and_(keep) if inplace else bits.bitwise_and(keep)).view(t.dtype)


class _LoRAAdd(torch.autograd.Function):
    """y += s * (dropout(x) A^T) B^T, in place on the base output y.

    Written out by hand for memory: for backward it keeps the input x (which the graph keeps anyway),
    the (tokens, r) product and a seed, and regenerates the dropout mask from the seed, instead of
    a dropped-out fp32 copy of x; and it adds into y with one addmm_ instead of making three
    (tokens, out) temporaries (the product, its scaled copy, the sum). The scale and 1/(1-p) are
    folded into the r-wide factors."""

    @staticmethod
    def forward(ctx, y, x, A, B, scaling, p):
        a, b = A.to(x.dtype), B.to(x.dtype)
        ctx.seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else None   # from the global RNG: reproducible
        xa = (_drop(x, _dropout_mask(x, p, ctx.seed)) if p > 0 else x) @ a.T   # (..., r)
        if p > 0:
            xa.mul_(1 / (1 - p))                                         # inverted dropout, on the narrow side
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b.T, alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, xa, A, B)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, A, B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        a, b = A.to(g.dtype), B.to(g.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        g_xa = g2 @ (b * s)                                              # (tokens, r)
        gB = (g2.T @ xa.reshape(-1, xa.shape[-1])) * s
        if p > 0:
            mask = _dropout_mask(x2, p, ctx.seed)
            g_xa.mul_(1 / (1 - p))
            gA = g_xa.T @ _drop(x2, mask)                                # the dropped-out x, recomputed
            gx = _drop(g_xa @ a, mask, inplace=True)
        else:
            gA = g_xa.T @ x2
            gx = g_xa @ a
        return g, gx.view(x.shape), gA.to(A.dtype), gB.to(B.dtype), None, None


class _RowScale(torch.autograd.Function):
    """DoRA's y = z * m / n + bias, each output feature (row of W) scaled by its own m / n, in place on z;
    n = ||W + s B A|| per row is a constant here.

    m's gradient needs z, the (tokens, out) product before the scale. Autograd would keep it; we keep
    the output y instead and divide: sum_t g * z / n = sum_t g * (y - bias) / m. The output is what the
    next op keeps anyway where it needs its input (attention keeps v, SwiGLU gate and up), so for those
    layers DoRA keeps nothing of the tokens' size. (m = 0 would divide by zero; it starts at ||W|| > 0,
    and a zero row of W makes n = 0 and the forward 0 / 0 already, as in peft.)"""

    @staticmethod
    def forward(ctx, z, m, n, bias):
        z.mul_((m / n).to(z.dtype))
        if bias is not None:
            z.add_(bias)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z, m, n, bias)
        return z

    @staticmethod
    def backward(ctx, g):
        y, m, n, bias = ctx.saved_tensors
        z_scaled = y.float() if bias is None else y.float() - bias.float()
        gm = (g.float() * z_scaled).reshape(-1, g.shape[-1]).sum(0) / m
        return g * (m / n).to(g.dtype), gm.to(m.dtype), None, None


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and "lora_" not in n]


def _matches(name: str, targets) -> bool:
    # peft's rule: a list matches a module whose name ends with ".target"; a string is a full regex.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, targets, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False, device=None) -> dict:
    """Wrap every linear whose name matches `targets` in a LoRALinear (DoRA with use_dora); freeze all
    but lora_ tensors. device: where the adapters go (default: their base's; a base on the meta device
    with device="cpu" draws real adapters over a model whose weights are still to come)."""
    names = [n for n in linear_names(model) if _matches(n, targets) and not n.startswith("lm_head")]
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer; this model has: "
                         f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear_names(model)}))}")
    for n in names:
        parent, _, attr = n.rpartition(".")
        mod = model.get_submodule(parent)
        setattr(mod, attr, LoRALinear(getattr(mod, attr), r, alpha, dropout, use_rslora, use_dora, device))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets) if not isinstance(targets, str)
                             else targets, use_rslora=use_rslora, use_dora=use_dora)
    return dict(wrapped=names, trainable=trainable, total=total)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module, on_nf4: str | None = None, unwrap: bool = False) -> nn.Module:
    """Merge every adapter into its base weight. unwrap=True also replaces each LoRALinear by its
    merged base, leaving a plain model that saves with HF names."""
    for name, m in lora_layers(model).items():
        m.merge(on_nf4)
        if unwrap:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, m.base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model


# ----------------------------------------------------------------------------------------------
# LoftQ: start the adapter where it undoes part of the NF4 error

@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scaling: float, iters: int = 1) -> tuple[dict, torch.Tensor, torch.Tensor, list]:
    """LoftQ's alternating minimisation (Li et al. 2023, algorithm 1) for one weight W (out, in):

        Q_t = NF4(W - s B_{t-1} A_{t-1})        (B_0 A_0 = 0: Q_1 is plain NF4 of W)
        s B_t A_t = best rank-r approximation of W - Q_t   (truncated SVD, split as sqrt of S each side)

    Returns (the NF4 state of Q_iters, A, B, errors): errors[0] = ||W - NF4(W)|| / ||W||, plain NF4's,
    then ||W - Q_t - s B_t A_t|| / ||W|| for t = 1 .. iters. Q_1 is QLoRA's own base, so with iters=1
    only the adapter's start differs from QLoRA. Unlike peft's loftq_init (A = R, B = L whatever
    alpha / r is), A and B are divided by sqrt(s), so the model starts at Q + L R for any alpha."""
    w = weight.float()
    target, errors = w, []
    for t in range(iters):
        state = quantize_nf4(target)
        residual = w - dequantize_nf4(state, torch.float32)
        if t == 0:
            errors.append((residual.norm() / w.norm()).item())
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = S[:r].sqrt()
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]
        errors.append(((residual - L @ R).norm() / w.norm()).item())
        if t + 1 < iters:
            target = w - L @ R
    return state, R / math.sqrt(scaling), L / math.sqrt(scaling), errors


def loftq_quantizer(targets, r: int, scaling: float, iters: int, found: dict):
    """For load_model(quantize=...): a function (name, weight) -> NF4 state that runs LoftQ on the
    linears LoRA will adapt (plain NF4 elsewhere) and leaves each one's (A, B, errors) in `found`,
    so the 16-bit weight of one layer at a time is needed, as it streams in."""
    def quantize(name: str, weight: torch.Tensor) -> dict:
        layer = name.removesuffix(".weight")
        if not _matches(layer, targets):
            return quantize_nf4(weight)
        state, A, B, errors = loftq(weight, r, scaling, iters)
        found[layer] = (A, B, errors)
        return state
    return quantize


def apply_loftq(model: nn.Module, found: dict, iters: int):
    """Put loftq_quantizer's A and B into the model's LoRA layers (after apply_lora); DoRA's magnitude
    is then restarted at ||Q + s B A||, so the model still starts exactly at Q + s B A."""
    layers = lora_layers(model)
    if set(layers) != set(found):   # a base stored in 4-bit (a bitsandbytes folder) has no 16-bit weights to start from
        raise ValueError(f"LoftQ had the 16-bit weights of {len(found)} of the {len(layers)} adapted layers: it needs "
                         f"a 16-bit checkpoint ({getattr(model, 'source', 'this model')} is not one)")
    model.lora_config["loftq_iters"] = iters
    with torch.no_grad():
        for name, m in layers.items():
            A, B, _ = found[name]
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
            if m.use_dora:
                m.lora_magnitude_vector.copy_(m.weight_norm())


LOFTQ_BASE = "loftq_base.safetensors"


def save_loftq_base(model: nn.Module, out):
    """The NF4 codes of the adapted layers, which LoftQ with more than one iteration changes: the
    adapter is only right over this base. Written once per run (the base is frozen), atomically."""
    from safetensors.torch import save_file
    tensors = {}
    for name, m in lora_layers(model).items():
        for key, t in m.base.state().items():
            if isinstance(t, torch.Tensor):
                tensors[f"{name}.{key}"] = t.detach().reshape(-1).contiguous().cpu()
    tmp = Path(out) / (LOFTQ_BASE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, Path(out) / LOFTQ_BASE)


def use_loftq_base(model: nn.Module, path, iters: int):
    """Make each adapted layer's base the one its LoftQ adapter was trained over: Q = NF4(W) for one
    iteration (recomputed: NF4 is deterministic), else the codes saved in the run. On a 16-bit base
    (merge.py, the audit's merge paths) the layer gets Q dequantized: merging into W itself would add
    the NF4 error twice, once in W and once in the adapter that was started to undo it."""
    from safetensors import safe_open
    file = Path(path) / LOFTQ_BASE
    if iters > 1 and not file.is_file():
        raise FileNotFoundError(f"{file}: missing; a LoftQ adapter of {iters} iterations is trained over the NF4 "
                                "base saved beside it (copy the whole run folder)")
    layers = {n: m for n, m in lora_layers(model).items() if not m.lora_A.weight.is_meta}   # meta: shape checks
    if iters == 1:   # Q = NF4(W): already there on an NF4 base
        for m in layers.values():
            if not isinstance(m.base, NF4Linear):
                _set_base(m, quantize_nf4(m.base.weight.detach()))
        return
    with safe_open(str(file), "pt", device=str(next(iter(layers.values())).lora_A.weight.device) if layers else "cpu") as f:
        for name, m in layers.items():
            nf4 = isinstance(m.base, NF4Linear)
            state = dict(shape=(m.out_features, m.in_features), block_size=64,
                         dtype=m.base.orig_dtype if nf4 else m.base.weight.dtype,
                         **{k: f.get_tensor(f"{name}.{k}") for k in ("packed", "absmax", "nested_absmax", "offset")})
            state["offset"] = state["offset"].reshape(())
            _set_base(m, state)


def _set_base(m: LoRALinear, state: dict):
    """An adapted layer's base becomes the NF4 weight `state`: as NF4 on an NF4 base, dequantized on a 16-bit one."""
    if isinstance(m.base, NF4Linear):
        m.base = NF4Linear(state, m.base.bias, m.base.compute_dtype)
    else:
        with torch.no_grad():
            m.base.weight.copy_(dequantize_nf4(state, torch.float32))
    m.forget_norm()


# ----------------------------------------------------------------------------------------------
# peft's file format

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, base_name: str = "") -> dict:
    c = model.lora_config
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c["r"], "lora_alpha": c["alpha"],
            "lora_dropout": c["dropout"], "target_modules": c["targets"], "bias": "none",
            "base_model_name_or_path": base_name, "use_rslora": c["use_rslora"], "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "use_dora": c.get("use_dora", False),
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def base_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the base model: its shape and a few weights that no quantization touches (the
    final norm, the first block's norms, the first rows of the embedding), each rounded to bf16 so the
    same checkpoint loaded in fp32 or bf16, with a 16-bit or an NF4 base, gives the same value."""
    if getattr(model, "fingerprint", None):   # --fsdp: taken once, on every rank, after loading
        return model.fingerprint
    import hashlib
    h = hashlib.sha256()
    a = getattr(model, "args", None)
    if a is not None:
        h.update(json.dumps([a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.intermediate_size, a.vocab_size]).encode())
    params = dict(model.named_parameters())
    if any(p.is_meta for p in params.values()):
        return None   # a model with no weights yet (shape checks): nothing to fingerprint
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.post_attention_layernorm.weight", "model.embed_tokens.weight"):
        if name in params:
            h.update(full(params[name].detach())[:64].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_tensors(model: nn.Module) -> dict:
    """The adapter's tensors under peft's names, fp32 on the CPU. Under --fsdp each is gathered whole from
    the ranks, one at a time: every rank must call this."""
    tensors = {}
    for name, m in lora_layers(model).items():
        own = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}
        if m.use_dora:
            own["lora_magnitude_vector"] = m.lora_magnitude_vector
        for k, t in own.items():
            tensors[f"{PEFT_PREFIX}{name}.{k}"] = full(t.detach()).float().contiguous().cpu()
    return tensors


def save_adapter(model: nn.Module, out, base_name: str = "", tensors: dict | None = None):
    """adapter_config.json + adapter_model.safetensors, each written to a temporary name then renamed
    (a failed write leaves the old files as they were). The base's fingerprint goes in the safetensors
    metadata, which peft ignores, so the adapter cannot be merged into another base unnoticed.
    tensors: adapter_tensors(model), where the caller has them already (--fsdp gathers them on every rank)."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model) if tensors is None else tensors
    tmp_st, tmp_cfg = out / "adapter_model.safetensors.tmp", out / "adapter_config.json.tmp"
    try:
        meta = {"format": "pt", "base_fingerprint": base_fingerprint(model)}
        if model.lora_config.get("loftq_iters"):   # peft ignores it: over a bitsandbytes NF4 base, 1 iteration is right
            meta["loftq_iters"] = str(model.lora_config["loftq_iters"])
        save_file(tensors, str(tmp_st), metadata=meta)
        tmp_cfg.write_text(json.dumps(adapter_config(model, base_name), indent=2))
    except BaseException:
        tmp_st.unlink(missing_ok=True)
        tmp_cfg.unlink(missing_ok=True)
        raise
    os.replace(tmp_st, out / "adapter_model.safetensors")
    os.replace(tmp_cfg, out / "adapter_config.json")


def read_adapter(path) -> tuple[dict, dict, dict]:
    """(adapter_config.json, tensors, safetensors metadata) of a peft adapter folder."""
    from safetensors import safe_open
    path = Path(path)
    cfg_file, st_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, st_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (an adapter folder holds adapter_config.json and "
                                    "adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg['peft_type']!r} is not LORA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_file}: per-layer rank/alpha patterns and fan_in_fan_out are not supported")
    try:
        with safe_open(str(st_file), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k.replace(".default", ""): f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors' own error types: truncated, corrupt header, ...
        raise ValueError(f"{st_file}: not a readable safetensors file ({e})") from None
    return cfg, tensors, meta


def load_adapter(model: nn.Module, path, force: bool = False) -> dict:
    """Apply (if needed) and fill LoRA layers from a peft adapter folder; check it fits the model and,
    when the file records one, that the base is the one it was trained on (force=True skips that)."""
    cfg, tensors, meta = read_adapter(path)
    where = str(Path(path) / "adapter_model.safetensors")
    dora = bool(cfg.get("use_dora"))
    if not lora_layers(model):
        apply_lora(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], 0.0, cfg.get("use_rslora", False), dora)
    layers = lora_layers(model)
    if any(m.use_dora != dora for m in layers.values()):
        raise ValueError(f"{where}: a {'DoRA' if dora else 'LoRA'} adapter (use_dora: {str(dora).lower()}), but the "
                         f"model's adapters are {'LoRA' if dora else 'DoRA'}")
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    expected |= {f"{PEFT_PREFIX}{n}.lora_magnitude_vector" for n in layers} if dora else set()
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{where}: adapter tensors for layers this model does not have, e.g. {unexpected[:3]}")
    if missing:
        raise ValueError(f"{where}: no adapter tensors for {len(missing)} target layer(s), e.g. {missing[:2]}")
    for n, m in layers.items():
        a, b = tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"]
        if a.shape[0] != cfg["r"] or b.shape[1] != cfg["r"]:
            raise ValueError(f"{where}: {n} has rank {a.shape[0]} in the file but r={cfg['r']} in adapter_config.json")
        if tuple(a.shape) != tuple(m.lora_A.weight.shape) or tuple(b.shape) != tuple(m.lora_B.weight.shape):
            raise ValueError(f"{where}: {n}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the "
                             f"model's A{tuple(m.lora_A.weight.shape)} B{tuple(m.lora_B.weight.shape)} "
                             "(an adapter for another base model?)")
        mag = tensors.get(f"{PEFT_PREFIX}{n}.lora_magnitude_vector")
        if mag is not None and tuple(mag.shape) != (m.out_features,):
            raise ValueError(f"{where}: {n}: DoRA magnitude of shape {tuple(mag.shape)}, the layer has "
                             f"{m.out_features} outputs")
    check_base(model, meta.get("base_fingerprint"), where, cfg.get("base_model_name_or_path"), force)
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"])
            if dora:
                m.lora_magnitude_vector.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_magnitude_vector"])
    if meta.get("loftq_iters"):
        cfg["loftq_iters"] = int(meta["loftq_iters"])
        use_loftq_base(model, path, cfg["loftq_iters"])
        model.lora_config["loftq_iters"] = cfg["loftq_iters"]
    return cfg


def check_base(model: nn.Module, fingerprint: str | None, where: str, trained_on: str | None, force: bool = False):
    """Refuse an adapter (or checkpoint) made on another base, whose shapes may match all the same."""
    if fingerprint is None or force:
        return   # adapters without a fingerprint (peft's own) load as before
    here = base_fingerprint(model)
    if here is not None and fingerprint != here:
        raise ValueError(f"{where} was trained on another base: {trained_on or '?'} (fingerprint {fingerprint}), "
                         f"not {getattr(model, 'source', 'this model')} (fingerprint {here}); the shapes may match, "
                         "but the result would be a different model. Pass --force to use it anyway")

