"""
NF4 4-bit quantization with double quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

    w (blocks of 64) -> absmax_b = max|w_b|,  code_i = nearest NF4 level to w_i / absmax_b  (4 bits)
    absmax -> offset = mean(absmax); absmax - offset in blocks of 256 -> 8-bit dynamic codes + fp32 scale
    storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight

Bit-exact with bitsandbytes' CPU `quantize_4bit` (same rounding, same nibble order: first element in
the high nibble); formats.py reads and writes the file layout transformers + bitsandbytes use for 4-bit
models. NF4Linear holds the packed weight in buffers; its autograd function keeps only those for backward.
"""
import math

import torch
import torch.nn as nn

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# Byte -> its two values (high nibble first), each pair viewed as one 8-byte word: dequantizing is a
# single gather that moves both values of a byte at once (5x faster than indexing a 16-entry table).
NF4_PAIRS = torch.stack([NF4_LEVELS[torch.arange(256) >> 4], NF4_LEVELS[torch.arange(256) & 15]], dim=1)
NF4_PAIR_WORDS = NF4_PAIRS.contiguous().view(torch.int64).view(-1)
# Weights per chunk when quantizing and dequantizing: the fp32 and index temporaries stay a few tens of
# MB whatever the layer's size (a 70B MLP matrix done whole made ~29 bytes of them per weight).
CHUNK = 1 << 22
# Dequantizing to 16 bits on a CPU goes a cache-sized piece at a time: a piece's fp32 values stay in cache
# between the lookup, the scaling and the cast, where a whole layer's went out to memory and back between
# them (a QLoRA step rebuilds every weight twice). On a GPU, and compiled, whole layers: fewer launches.
CPU_CAST_CHUNK = 1 << 16
_on_device = {}


def _constant_on(table: torch.Tensor, device) -> torch.Tensor:
    """One of this file's constant tables on `device`, copied there once: a copy per call would be a
    host-to-device transfer, and a synchronisation, in every NF4 layer call and optimizer step."""
    key = (id(table), device)
    if key not in _on_device:
        _on_device[key] = table.to(device)
    return _on_device[key]


def place_tables(device) -> None:
    """Copy the dequantization tables to `device` now. torch.compile traces dequantize, and a first copy
    made while it traces is a side effect it cannot keep (it stops with an error), so call this first."""
    for table in (NF4_PAIR_WORDS, DYNAMIC_SIGNED, DYNAMIC_UNSIGNED):
        _constant_on(table, torch.device(device))


def _pair_words(device) -> torch.Tensor:
    return _constant_on(NF4_PAIR_WORDS, device)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-value 8-bit dynamic map (Dettmers 2015): a sign, a decimal exponent 10^-6..10^0, and
    a linear fraction whose resolution grows as the exponent does. Built exactly as bitsandbytes
    builds it, float32 throughout, so the codes agree bit for bit."""
    data = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))   # the signed map has 255 values; bitsandbytes pads with zeros
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_SIGNED = dynamic_map(True)
DYNAMIC_UNSIGNED = dynamic_map(False)


def _blockwise_absmax_scale(x: torch.Tensor, block: int):
    """x flat fp32 -> (absmax per block, x scaled into [-1, 1]).

    Full blocks multiply by 1/absmax, a partial last block divides: bitsandbytes does exactly this,
    and the two round differently in the last bit, which can move a value across a midpoint."""
    n = x.numel()
    full = n - n % block
    xb = x[:full].view(-1, block)
    absmax = xb.abs().amax(dim=1)
    scaled = (xb * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)
    if full < n:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, (x[full:] / am).clamp(-1, 1)])
    return absmax, scaled


_prefix_tables = {}


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest value of a sorted map of <= 256 values for each fp32 value, ties to the
    lower index: exactly bucketize(scaled, midpoints), done as two lookups on the value's top 16 bits (the
    first midpoint at or above that range's floats, and that midpoint) plus one comparison. Every float
    sharing those 16 bits lies in a range that holds at most one midpoint of our maps (checked when the
    tables are built; else we fall back to bucketize). ~5x faster than bucketize, and no int64 anywhere."""
    key = (tuple(code.tolist()), scaled.device)
    if key not in _prefix_tables:
        mids = ((code[:-1] + code[1:]) / 2).to(scaled.device)
        p = torch.arange(65536, dtype=torch.int32, device=scaled.device) << 16
        lo, hi = p.view(torch.float32), (p | 0xFFFF).view(torch.float32)
        first = torch.bucketize(torch.minimum(lo, hi).nan_to_num(0), mids)
        last = torch.bucketize(torch.maximum(lo, hi).nan_to_num(0), mids)
        ok = bool((last - first).max() <= 1)
        above = torch.cat([mids, mids.new_tensor([float("inf")])])[first]   # the midpoint a value may pass
        _prefix_tables[key] = (first.to(torch.uint8), above, mids, ok)
    first, above, mids, ok = _prefix_tables[key]
    if not ok:
        return torch.bucketize(scaled, mids).to(torch.uint8)
    prefix = (scaled.contiguous().view(torch.int32) >> 16).bitwise_and_(0xFFFF).view(-1)
    i = first.index_select(0, prefix).view(scaled.shape)
    return i.add_(scaled > above.index_select(0, prefix).view(scaled.shape))


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int = 256):
    """8-bit blockwise quantization with a sorted 256-value map: (uint8 codes, fp32 absmax per block).
    Nearest code, ties to the lower one (as bitsandbytes' CUDA kernel and pure-PyTorch backend)."""
    absmax, scaled = _blockwise_absmax_scale(x.reshape(-1).float(), block)
    q = nearest_code(scaled, code)
    return q.view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int = 256):
    table = _constant_on(code, q.device) if any(code is c for c in (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED)) \
        else code.to(q.device)
    vals = table.index_select(0, q.reshape(-1).int())
    return _scale_blocks(vals, absmax, block).view(q.shape)


def _scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """vals * absmax of its block, in place (vals is a fresh tensor the caller gives up)."""
    n = vals.numel()
    pad = absmax.numel() * block - n
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    return vals.view(-1, block).mul_(absmax[:, None]).view(-1)[:n]


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict:
    """Quantize any float tensor to NF4. Returns the state as a dict of tensors:
    packed (uint8, ceil(n/2)), absmax (fp32, or uint8 codes if double_quant) and, with
    double_quant, nested_absmax (fp32 per 256 absmax values) and offset (fp32 scalar).
    Done CHUNK weights at a time (blocks are independent, so the bytes are the same)."""
    if block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"block_size {block_size}: must be a power of two in 32..4096")
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a float tensor, got {w.dtype}")
    flat, n = w.reshape(-1), w.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=w.device)
    step = max(block_size, CHUNK // block_size * block_size)
    for s in range(0, n, step):
        e = min(n, s + step)
        am, scaled = _blockwise_absmax_scale(flat[s:e].float(), block_size)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))   # the odd tail becomes code 7 (0.0)
        q = nearest_code(scaled, NF4_LEVELS)
        packed[s // 2:s // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        absmax[s // block_size:s // block_size + am.numel()] = am
    state = dict(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, block_size=block_size)
    if double_quant:
        # The absmax values are all positive and similar; subtracting their mean centres them so
        # the signed 8-bit map spends its resolution where they are.
        offset = absmax.mean()
        state["absmax"], state["nested_absmax"] = quantize_blockwise(absmax - offset, DYNAMIC_SIGNED, 256)
        state["offset"] = offset
    return state


def nf4_absmax(state: dict) -> torch.Tensor:
    if "nested_absmax" not in state:
        return state["absmax"]
    return dequantize_blockwise(state["absmax"], state["nested_absmax"], DYNAMIC_SIGNED, 256) + state["offset"]


def dequantize_nf4(state: dict, dtype=None) -> torch.Tensor:
    """Inverse of quantize_nf4: level * absmax in fp32 (as bitsandbytes), then cast to dtype; a layer
    larger than CHUNK weights (CPU_CAST_CHUNK when a CPU casts) goes chunk by chunk into the output, so no
    fp32 copy of it is ever whole."""
    n, block, dtype = math.prod(state["shape"]), state["block_size"], dtype or state["dtype"]
    packed, absmax = state["packed"], nf4_absmax(state)
    words = _pair_words(packed.device)

    def values(s, e):   # weights s..e (s a multiple of the chunk), fp32
        v = words.index_select(0, packed[s // 2:(e + 1) // 2].int()).view(torch.float32)[:e - s]
        return _scale_blocks(v, absmax[s // block:-(-e // block)], block)
    chunk = CHUNK
    if packed.device.type == "cpu" and dtype != torch.float32 and not torch.compiler.is_compiling():
        chunk = CPU_CAST_CHUNK
    if n <= chunk:
        return values(0, n).view(state["shape"]).to(dtype)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = max(block, chunk // block * block)
    for s in range(0, n, step):
        out[s:min(n, s + step)] = values(s, min(n, s + step))
    return out.view(state["shape"])


# ----------------------------------------------------------------------------------------------
# NF4Linear

class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from 4 bits in forward and again in backward.

    Saving the dequantized W for backward would keep a 16-bit copy of every layer alive until the
    backward pass, which is the memory QLoRA exists to save; the frozen W needs no gradient."""

    @staticmethod
    def forward(ctx, x, layer, weight=None):
        ctx.layer = layer   # the module holds only packed buffers; nothing of W's size is saved
        return x @ (layer.dequantize() if weight is None else weight).T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(), None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (buffers only, nothing to train)."""

    def __init__(self, state: dict, bias: torch.Tensor | None = None, compute_dtype=torch.float32):
        super().__init__()
        self.out_features, self.in_features = state["shape"]
        self.block_size = state["block_size"]
        self.compute_dtype = compute_dtype
        self.orig_dtype = state["dtype"]
        self.register_buffer("packed", state["packed"])
        self.register_buffer("absmax", state["absmax"])
        self.double_quant = "nested_absmax" in state
        if self.double_quant:
            self.register_buffer("nested_absmax", state["nested_absmax"])
            self.register_buffer("offset", state["offset"].reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @classmethod
    def from_weight(cls, weight, bias=None, compute_dtype=None, block_size=64, double_quant=True):
        return cls(quantize_nf4(weight.detach(), block_size, double_quant), bias,
                   compute_dtype or weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw):
        return cls.from_weight(linear.weight, linear.bias, **kw)

    def state(self) -> dict:
        # Codes are uint8; under --fsdp with an older torch they are held as bf16 pairs of bytes (fsdp.py)
        codes = lambda t: t if t.dtype in (torch.uint8, torch.float32) else t.view(torch.uint8)
        s = dict(packed=codes(self.packed), absmax=codes(self.absmax), shape=(self.out_features, self.in_features),
                 dtype=self.orig_dtype, block_size=self.block_size)
        if self.double_quant:
            s.update(nested_absmax=self.nested_absmax, offset=self.offset)
        return s

    @property
    def weight(self):
        """The dequantized weight (a fresh tensor each call), for code that reads `.weight`."""
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self.state(), self.compute_dtype)

    def forward(self, x, weight=None):
        """weight: this layer's dequantize(), if the caller has it already (DoRA needs it for its norm)."""
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self, weight)
        return y + self.bias if self.bias is not None else y

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self):
        n = self.in_features * self.out_features
        return (f"in={self.in_features}, out={self.out_features}, block={self.block_size}, "
                f"double_quant={self.double_quant}, {self.nbytes()} bytes ({8 * self.nbytes() / n:.3f} bits/param)")


def quantization_error(model: nn.Module) -> dict:
    """What NF4 would cost each linear of a 16-bit model (the original weights are needed, so this takes
    the model before quantization): mean absolute error and relative Frobenius error per layer."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
            w = mod.weight.detach().float()
            err = (dequantize_nf4(quantize_nf4(w), torch.float32) - w).abs()
            out[name] = dict(mean_abs=err.mean().item(), rel=(err.norm() / w.norm()).item())
    return out
