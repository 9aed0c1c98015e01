"""
A Llama-family transformer (Llama 1/2/3, Mistral, Qwen2, SmolLM): the network and nothing else.

    x -> embed_tokens -> [ x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x)) ] x L
      -> norm -> lm_head -> logits

Attribute names are HF's (q_proj ... down_proj, input_layernorm, ...) and RoPE is HF's rotate-half
form, so an HF checkpoint loads with an identity name map and no q/k permutation exists outside the
GGUF reader. Reading and writing checkpoints is formats.py's job; this file imports nothing of the project.

    from formats import load_model
    model = load_model("default")                      # SmolLM2-135M-Instruct, fetched once
    logits = model(input_ids)                          # (B, T) -> (B, T, vocab)
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...} as in config.json
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    attention_bias: bool = False      # q/k/v biases (Qwen2)
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # the original config.json, written back on save

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"{where}: model_type {mt!r} is not supported (llama, mistral, qwen2)")
        # transformers >= 4.56 writes rope settings as `rope_parameters`; older files use rope_theta/rope_scaling.
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (llama3, linear)")
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
        n_heads = cfg["num_attention_heads"]
        max_len = cfg.get("max_position_embeddings", 8192)
        if mt == "mistral" and cfg.get("sliding_window"):
            # We do not implement a sliding window, so we refuse contexts longer than it instead.
            max_len = min(max_len, cfg["sliding_window"])
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=max_len, tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", mt == "qwen2"), model_type=mt, extra=cfg)

    def to_hf_config(self) -> dict:
        if self.rope_scaling and self.rope_scaling["rope_type"] == "freq_factors":
            raise ValueError("this model's RoPE scaling came from a GGUF rope_freqs tensor, which config.json cannot "
                             "express; use the model's HF folder as the base to write an HF folder")
        cfg = dict(self.extra)
        cfg.update(model_type=self.model_type, architectures=[_ARCH[self.model_type]], hidden_size=self.dim,
                   num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                   num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                   intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                   rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                   max_position_embeddings=self.extra.get("max_position_embeddings", self.max_seq_len),
                   tie_word_embeddings=self.tie_embeddings, hidden_act="silu")
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.attention_bias
        cfg.pop("rope_parameters", None)
        cfg.pop("quantization_config", None)
        return cfg


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# ----------------------------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 as HF does, then cast back before scaling by the weight. In fp32 autograd
        # keeps just x and 1/rms for backward; in 16 bits it would keep an fp32 copy of x (a quarter of
        # a 7B block's saved activations), so there a function of our own keeps x as it is.
        if x.dtype != torch.float32:
            return _RMSNorm16.apply(x, self.weight, self.eps)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _RMSNorm16(torch.autograd.Function):
    """RMSNorm of a 16-bit x: saves x (16-bit) and 1/rms (fp32); the backward runs in fp32.

        y = x / rms(x),  out = w * y  =>  dx = (dout * w - y * mean(dout * w * y)) / rms(x)"""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        y = x.float() * rstd
        gw = g.float() * weight.float()
        dx = (gw - y * (gw * y).mean(-1, keepdim=True)) * rstd
        dw = (g.float() * y.to(x.dtype).float()).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype) \
            if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dw, None


def precompute_rope(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with llama3, linear or GGUF per-frequency scaling applied."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s and s["rope_type"] == "freq_factors":   # from a GGUF's rope_freqs tensor: the same llama3 curve, tabulated
        inv_freq = inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device=device)
    elif s and s["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    freqs = positions[..., None].float() * inv_freq          # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]   # (B, 1, T, hd)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer, in buffers allocated once for `capacity`
    tokens (doubled if a sequence outgrows them): one write per new token, no copy of the whole cache."""

    def __init__(self, n_layers: int, capacity: int = 256):
        self.k, self.v, self.n = [None] * n_layers, [None] * n_layers, [0] * n_layers
        self.capacity = capacity
        self.pad, self.mask = 0, None   # generate_batch: left padding (B, 1), keys each row sees (B, 1, 1, capacity)

    def update(self, i, k, v):
        n, t = self.n[i], k.shape[2]
        for buf, x in ((self.k, k), (self.v, v)):
            if buf[i] is None or n + t > buf[i].shape[2]:   # allocate once; grow only if outgrown
                new = x.new_empty(*x.shape[:2], max(self.capacity, 2 * (n + t) if n else t), x.shape[3])
                if n:
                    new[:, :, :n] = buf[i][:, :, :n]
                buf[i] = new
            buf[i][:, :, n:n + t] = x
        self.n[i] = n + t
        return self.k[i][:, :, :n + t], self.v[i][:, :, :n + t]

    def __len__(self):
        return self.n[0]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, args.n_heads, args.n_kv_heads, args.head_dim
        b = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=b)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=b)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=b)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, spans=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv != self.n_heads   # each group of n_heads/n_kv query heads shares one k/v head
        if spans is None:   # a left-padded batch decodes a token per row, through its cache's key mask
            mask = cache.mask[..., :k.shape[2]] if cache is not None and cache.mask is not None else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and mask is None, enable_gqa=gqa)
        else:
            y = segment_attention(q, k, v, spans, gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@torch.compiler.disable   # a loop over the segments: compiled, it would be unrolled and recompiled for every batch
def segment_attention(q, k, v, spans: torch.Tensor, gqa: bool):
    """Causal attention within each segment, on its own slice: no (T, T) mask is ever built, the fused
    kernels apply, and padding costs nothing (it gets zeros). spans: (segments, 3) rows of (row, start, end),
    a tensor rather than a list so that torch.compile sees one input, not a new constant every batch."""
    if len(spans) and use_varlen(q):
        # One flash call for every segment of every row: their tokens gathered into a (tokens, heads, hd)
        # batch, cut by cumulative lengths, then put back in place (padding gets zeros).
        B, H, T, D = q.shape
        n = spans[:, 2] - spans[:, 1]
        cu = F.pad(n.cumsum(0), (1, 0))
        index = torch.arange(int(cu[-1])) + torch.repeat_interleave(spans[:, 0] * T + spans[:, 1] - cu[:-1], n)
        index, cu = index.to(q.device, non_blocking=True), cu.to(q.device, torch.int32, non_blocking=True)
        flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D).index_select(0, index)
        y = varlen_attn(flat(q), flat(k), flat(v), cu, cu, T, T, window_size=(-1, 0), enable_gqa=gqa)
        return q.new_zeros(B * T, H, D).index_copy(0, index, y).view(B, T, H, D).transpose(1, 2)
    rows, dt = spans.tolist(), q.dtype
    starts, ends = [s for _, s, _ in rows], [e for _, _, e in rows]
    # fp32 on CPUs: torch's bf16 CPU flash backward is slower, and keeps ~8 MB of kernels per new length for good
    q, k, v = (q, k, v) if q.is_cuda else (q.float(), k.float(), v.float())
    if q.shape[0] == 1 and rows and starts == [0] + ends[:-1] and ends[-1] == q.shape[2]:
        # Segments tiling one row (CPU micro-batches): split + cat, whose backward makes no zero row per segment
        n = [e - s for s, e in zip(starts, ends)]
        return torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)
                          for a, b, c in zip(q.split(n, 2), k.split(n, 2), v.split(n, 2))], 2).to(dt)
    y = q.new_zeros(q.shape)
    for b, s, e in rows:
        y[b:b + 1, :, s:e] = F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e],
                                                            v[b:b + 1, :, s:e], is_causal=True, enable_gqa=gqa)
    return y.to(dt)


try:   # flash attention over packed sequences where torch has it; 2.10's (no causal windows, no GQA) is left out
    from torch.nn.attention.varlen import varlen_attn
    varlen_attn = varlen_attn if "enable_gqa" in (varlen_attn.__kwdefaults__ or {}) else None
except ImportError:
    varlen_attn = None


def use_varlen(q) -> bool:
    """Flash's kernels need CUDA, 16-bit inputs, an Ampere or newer GPU and head_dim <= 256 (no CPU kernel)."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device) >= (8, 0))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward (autograd would also keep silu(gate):
    one more (tokens, intermediate_size) tensor per layer, the widest activation of the model)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        # In fp32 whatever the dtype (in bf16 the sigmoid's derivative loses ~1% for large gates), cast once;
        # aten's silu_backward is g * sig * (1 + gate * (1 - sig)) in one pass.
        gate, up = ctx.saved_tensors
        g32, gf = g.float(), gate.float()
        return torch.ops.aten.silu_backward(g32 * up.float(), gf).to(gate.dtype), (F.silu(gf) * g32).to(up.dtype)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, spans=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, spans, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Layers(nn.Module):
    """Holds `layers` and `norm` so parameter names match HF's `model.layers.0...`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args, self.model = args, Layers(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", precompute_rope(args), persistent=False)
        self.grad_checkpoint = False

    def compile_blocks(self, **kw):
        """torch.compile each block in place, regionally as torchtune does: every block runs the same code
        on parameters the compiled graph takes as inputs, so one compilation serves all layers and the
        compile time does not grow with depth. The segment loop of attention stays eager (named there)."""
        # AOTAutograd's common-subexpression pass sees that an NF4 layer's backward dequantizes the same
        # buffers as its forward and keeps the forward's dequantized weight for backward instead: every
        # layer's weight in 16/32 bits, what QLoRA exists to avoid (a saved-tensors test counts it).
        import torch._functorch.config
        torch._functorch.config.cse = False
        for layer in self.model.layers:
            layer.compile(**kw)

    def hidden(self, input_ids, segment_ids=None, cache=None):
        """Final hidden states (B, T, dim).

        segment_ids (B, T): 0 = padding, 1, 2, ... = examples packed in one row. A token attends
        only to earlier tokens of its own segment and its position restarts at 0 in each segment,
        so one mechanism covers left/right padding and packing. None = one causal sequence."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        spans, positions, longest = None, None, T + len(cache or ())
        if segment_ids is not None:
            if cache is not None and len(cache):
                raise ValueError("segment_ids with a filled cache are not supported; decode one row at a time")
            spans, positions = segment_spans(segment_ids)
            longest = int((spans[:, 2] - spans[:, 1]).max()) if len(spans) else 0   # positions restart per segment
        else:
            start = 0 if cache is None else len(cache) - cache.pad
            positions = (torch.arange(T, device=x.device) + start).expand(B, T)
        if longest > self.args.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens is longer than the model's limit of {self.args.max_seq_len}")
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, spans, use_reentrant=False)
            else:
                x = layer(x, cos, sin, spans, cache)
        return self.model.norm(x)

    def forward(self, input_ids, segment_ids=None, cache=None, last_only: bool = False):
        """Logits (B, T, vocab); last_only: for the last position only (B, 1, vocab), as generation
        needs: the vocabulary projection of every prompt position would be wasted."""
        h = self.hidden(input_ids, segment_ids, cache)
        return self.lm_head(h[:, -1:] if last_only else h)


def segment_spans(segment_ids):
    """The (row, start, end) of each run of equal non-zero ids, as a (segments, 3) CPU tensor, and the
    positions (B, T), restarting at 0 in each run."""
    spans, positions = [], torch.zeros(segment_ids.shape, dtype=torch.long)
    for b, row in enumerate(segment_ids.tolist()):
        s = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[s]:
                if row[s] != 0:
                    spans.append((b, s, t))
                    positions[b, s:t] = torch.arange(t - s)
                s = t
    return torch.tensor(spans, dtype=torch.long).view(-1, 3), positions.to(segment_ids.device)
