"""The GPU path against the peers' own CUDA kernels: NF4 bytes and values against bitsandbytes, logits (16-bit
and NF4 bases) against transformers (+ bitsandbytes), AdamW8bit against bitsandbytes' AdamW8bit, training eager
against compiled, and --fsdp on nccl against one process. Skipped without CUDA; `bash bench/gpu.sh` runs them
(with the other tests that have "cuda" in their names)."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint
from test_train import _adapter, _cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_nf4_bytes_and_values_equal_bitsandbytes(dtype):
    """On the GPU bitsandbytes rounds the 8-bit absmax codes to the nearest value, as we do everywhere (its CPU
    kernel does not: tests/test_nf4.py), so every byte of the double-quantized state must be equal, and so
    must the dequantized weight. Shapes: the default model's MLP matrix, and one with a partial last block."""
    F = pytest.importorskip("bitsandbytes.functional")
    from nf4 import dequantize_nf4, quantize_nf4
    g = torch.Generator().manual_seed(0)
    for shape in ((1536, 576), (130, 9)):
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype).to(CUDA)
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = quantize_nf4(w, 64, double_quant=True)
        differ = {k: int((a.reshape(-1) != b.reshape(-1)).sum()) for k, a, b in (
            ("packed", ours["packed"], packed), ("absmax codes", ours["absmax"], qs.absmax),
            ("nested absmax", ours["nested_absmax"], qs.state2.absmax), ("offset", ours["offset"], qs.offset))}
        theirs, mine = F.dequantize_4bit(packed, qs), dequantize_nf4(ours)
        differ["dequantized"] = int((mine != theirs).sum())
        print(shape, dtype, "elements differing from bitsandbytes (CUDA):", differ)
        assert not any(differ.values()), differ


def test_cuda_logits_equal_transformers_16bit_and_nf4(tmp_path):
    """fp32 on the GPU: our model against transformers', and our NF4 base against transformers loading the same
    folder with bitsandbytes' nf4 + double quantization (the same bytes, so the same dequantized weights)."""
    import transformers
    from formats import load_model
    hf = make_hf_checkpoint(tmp_path / "m").to(CUDA)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        ours = load_model(tmp_path / "m", dtype=torch.float32, device=CUDA)
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
        hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, dtype=torch.float32,
                                                                device_map=CUDA)
        ours4 = load_model(tmp_path / "m", dtype=torch.float32, quantize="nf4", device=CUDA)
        theirs4 = hf4(ids).logits
        assert (theirs4 - hf(ids).logits).abs().max() > 1e-3   # quantized for real: not the 16-bit logits
        torch.testing.assert_close(ours4(ids), theirs4, atol=1e-4, rtol=0)


def test_cuda_adamw8bit_follows_bitsandbytes():
    """100 steps against bitsandbytes' CUDA AdamW8bit, which rounds the 8-bit states to the nearest code as we
    do: a far smaller drift than the CPU test allows (there bitsandbytes' codes are not the nearest). Tensors
    under 4096 elements have fp32 states: there bitsandbytes' fused kernel rounds its own way, and we are as
    close to it as torch's AdamW is (measured on an H200: 7.98e-6 and 8.10e-6 of the norm after 100 steps)."""
    bnb = pytest.importorskip("bitsandbytes")
    from optim import AdamW8bit
    from test_optim import _problem

    def run(opt_cls):
        params, targets = _problem()
        params = [torch.nn.Parameter(p.to(CUDA)) for p in params]
        targets = [t.to(CUDA) for t in targets]
        opt = opt_cls(params, lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
        g = torch.Generator().manual_seed(1)
        for _ in range(100):
            for p, t in zip(params, targets):
                p.grad = (p.detach() - t) * 2 + 0.05 * torch.randn(p.shape, generator=g).to(CUDA)
            opt.step()
        return [p.detach().cpu() for p in params]
    ours, theirs, ref = run(AdamW8bit), run(bnb.optim.AdamW8bit), run(torch.optim.AdamW)
    for a, b, r in zip(ours, theirs, ref):
        rel, fp32 = ((a - b).norm() / b.norm()).item(), ((r - b).norm() / b.norm()).item()
        print(f"{tuple(a.shape)}: |ours - bnb| / |bnb| = {rel:.2e}; |fp32 AdamW - bnb| / |bnb| = {fp32:.2e}")
        if a.numel() < 4096:
            assert rel < 1e-5 and rel <= fp32
        else:
            assert rel < 1e-3 and rel < 0.05 * fp32


def test_cuda_adapters_start_as_on_the_cpu():
    """The same seed draws the same adapter over a base on the GPU as on the CPU (and so as --fsdp, which draws
    over an empty model on the CPU): the GPU's generator would draw other numbers. Before this, a one-process run
    on a GPU and the same run with --fsdp started apart and were 2e-4 apart by step 3 (H200, tiny model, LoRA)."""
    from lora import LoRALinear
    adapters = []
    for device in ("cpu", CUDA):
        base = torch.nn.Linear(64, 32, device=device)
        torch.manual_seed(0)
        adapters.append(LoRALinear(base, 8, 16).lora_A.weight.cpu())
    assert torch.equal(*adapters)


@pytest.mark.parametrize("qlora", [False, True])
def test_cuda_compiled_trains_like_eager(tiny_run, tmp_path, qlora):
    """train() on the GPU in fp32: --compile gives the losses of eager mode (QLoRA with gradient checkpointing)."""
    kw = dict(qlora=qlora, grad_checkpoint=qlora, max_steps=4, eval_examples=0, batch_size=3, device=CUDA)
    eager = train_on(tiny_run, tmp_path, "eager", **kw)
    compiled = train_on(tiny_run, tmp_path, "compiled", compile=True, **kw)
    print("losses eager", eager["losses"], "compiled", compiled["losses"])
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("qlora", [False, True])
def test_cuda_bf16_steps_lower_the_loss(tiny_run, tmp_path, qlora):
    """The GPU's default dtype (bf16), packed segments through flash's variable-length kernel: it learns."""
    s = train_on(tiny_run, tmp_path, "bf16", qlora=qlora, max_steps=30, lr=1e-2, dtype="bfloat16", device=CUDA)
    assert s["dtype"] == "bfloat16"
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.2
    assert sum(s["losses"][-5:]) < sum(s["losses"][:5])


def train_on(tiny_run, tmp_path, name, **kw):
    from train import train
    return train(_cfg(tiny_run, tmp_path, out=str(tmp_path / name), **kw))


@pytest.mark.parametrize("qlora,offload", [(True, False), (True, True), (False, False), (False, True)])
def test_cuda_fsdp_on_nccl_equals_one_process(tiny_run, tmp_path, qlora, offload):
    """torchrun --fsdp on the GPUs at hand (nccl; every GPU up to 2), with checkpointing, with and without
    --fsdp-cpu-offload: the losses and adapter of one process without --fsdp on one GPU, same global batch.
    With torch 2.11 (whose FSDP2 refuses integer parameters) the NF4 codes are sharded as bf16 pairs of bytes."""
    from test_fsdp import assert_same_adapter, cli_args, torchrun
    world = min(2, torch.cuda.device_count())
    flags = dict(qlora=qlora, grad_checkpoint=True)
    one = train_on(tiny_run, tmp_path, "one", batch_size=4, max_steps=3, device=CUDA, **flags)
    args = cli_args(tiny_run, tmp_path / "fsdp", 4 // world, 3, **{k: v for k, v in flags.items() if v},
                    **(dict(fsdp_cpu_offload=True) if offload else {}))
    args[args.index("--device") + 1] = CUDA
    r = torchrun(world, 29650 + offload + 2 * qlora, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    print(f"world {world}, qlora {qlora}, offload {offload}: peak per GPU {s['peak_mem_per_rank']}, base held "
          f"{s['base_bytes_per_rank']}")
    assert s["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert_same_adapter(_adapter(one["out"]), _adapter(tmp_path / "fsdp"))
