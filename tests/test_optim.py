"""optim.py: AdamW8bit against bitsandbytes' AdamW8bit (CPU), memory, resume, paging on CUDA."""
import copy
import os

import pytest
import torch

from optim import AdamW8bit


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(300, 256, generator=g) * 0.1, torch.randn(64, 48, generator=g) * 0.1,
              torch.randn(1000, generator=g) * 0.1]
    targets = [torch.randn(p.shape, generator=g) for p in params]
    return params, targets


def _run(opt_cls, steps=100, seed=0, **kw):
    params, targets = _problem(seed)
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(params, lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p, t in zip(params, targets):
            p.grad = (p.detach() - t) * 2 + 0.05 * torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def test_follows_bitsandbytes_adamw8bit():
    """100 steps against bitsandbytes' CPU AdamW8bit. Tensors under 4096 elements (fp32 states) match
    bit for bit. For 8-bit states we round to the nearest code, as bitsandbytes' CUDA kernel does;
    its CPU kernel looks codes up with a bucketed search that, near zero, lands up to 7 codes off
    (test below). So we bound the drift: small, and far below the 8-bit-vs-fp32 difference itself."""
    bnb = pytest.importorskip("bitsandbytes")
    ours, _ = _run(AdamW8bit)
    theirs, _ = _run(bnb.optim.AdamW8bit)
    ref, _ = _run(torch.optim.AdamW)
    start, _ = _problem()
    for a, b, r, p0 in zip(ours, theirs, ref, start):
        rel = ((a - b).norm() / b.norm()).item()
        moved = ((a - b).norm() / (b - p0).norm()).item()
        fp32 = ((r - b).norm() / b.norm()).item()
        print(f"{tuple(a.shape)}: |ours - bnb| / |bnb| = {rel:.2e} ({moved:.2e} of the distance moved); "
              f"|fp32 AdamW - bnb| / |bnb| = {fp32:.2e}")
        if a.numel() < 4096:
            assert torch.equal(a, b)
        else:
            assert rel < 1e-2 and rel < 0.25 * fp32


def test_bitsandbytes_cpu_codes_are_not_nearest_ours_are():
    """Why the 8-bit states drift apart: on the same input, every code where we differ from
    bitsandbytes' CPU quantizer is strictly nearer to the value in ours."""
    F = pytest.importorskip("bitsandbytes.functional")
    from nf4 import DYNAMIC_UNSIGNED, quantize_blockwise
    v = (torch.randn(256 * 40, generator=torch.Generator().manual_seed(0)) * 0.05) ** 2
    theirs, st = F.quantize_blockwise(v, code=F.create_dynamic_map(signed=False), blocksize=256)
    ours, absmax = quantize_blockwise(v, DYNAMIC_UNSIGNED, 256)
    assert torch.equal(absmax, st.absmax)
    x = (v.view(-1, 256) / absmax[:, None]).view(-1)
    err = lambda q: (DYNAMIC_UNSIGNED[q.long()] - x).abs()
    differ = ours != theirs
    print(f"codes differing: {int(differ.sum())} of {v.numel()}, up to {int((ours.int() - theirs.int()).abs().max())} apart")
    assert (err(ours)[differ] < err(theirs)[differ]).all()
    assert (err(ours) <= err(theirs)).all()


def test_state_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state_bytes() / p.numel() <= 2.1


def test_state_dict_resume_is_exact():
    full, _ = _run(AdamW8bit, steps=20)
    params, targets = _problem()
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = AdamW8bit(params, lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)

    def steps(opt, n):
        for _ in range(n):
            for p, t in zip(params, targets):
                p.grad = (p.detach() - t) * 2 + 0.05 * torch.randn(p.shape, generator=g)
            opt.step()
    steps(opt, 12)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = AdamW8bit(params, lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
    opt2.load_state_dict(sd)
    steps(opt2, 8)
    for a, b in zip(params, full):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paging needs CUDA")
def test_paged_on_cuda_bounded_and_equal():
    """Paged, the states live in host memory and a step holds at most two runs' states on the GPU (the one being
    updated and the next, prefetched) on top of the working copies that an unpaged step makes too; the
    parameters come out bit for bit the same. (Each 2048 x 2048 parameter is a run of its own.)"""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(2048, 2048, device="cuda")) for _ in range(4)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    paged, plain = AdamW8bit(ps, lr=1e-3, paged=True), AdamW8bit(qs, lr=1e-3)
    for _ in range(3):   # the last step's peaks count: the first one also allocates the unpaged states
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        peaks = []
        for opt in (paged, plain):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            peaks.append(torch.cuda.max_memory_allocated() - base)
    assert all(t.device.type == "cpu" for st in paged.state.values() for t in st.values() if torch.is_tensor(t))
    run = 2 * 2048 * 2048 + 2 * 4 * 2048 * 2048 // 256   # one parameter's 8-bit states and their absmax
    print(f"step's peak above the resident tensors: paged {peaks[0] / 2**20:.1f} MB, unpaged {peaks[1] / 2**20:.1f} MB; "
          f"one run's states {run / 2**20:.1f} MB")
    assert peaks[0] <= peaks[1] + 2 * run, peaks
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.skipif(os.environ.get("PURE_QLORA_SKIP_DEFAULT") == "1", reason="no default model")
def test_real_fine_tune_losses_follow_adamw(tmp_path):
    """The default model, a few real steps: every logged loss within 2% of torch's AdamW."""
    from train import TrainConfig, train
    kw = dict(max_steps=5, seq_len=128, batch_size=2, eval_examples=0, dropout=0.0, log_every=100, device="cpu")
    ref = train(TrainConfig(out=str(tmp_path / "adamw"), optim="adamw", **kw))["losses"]
    ours = train(TrainConfig(out=str(tmp_path / "8bit"), optim="adamw8bit", **kw))["losses"]
    print("adamw", [f"{x:.4f}" for x in ref], "adamw8bit", [f"{x:.4f}" for x in ours])
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(ref, ours))


def test_load_state_dict_keeps_8bit_states_8bit():
    """torch's Optimizer.load_state_dict casts state tensors to the parameter's dtype (uint8 codes -> fp32,
    4x the memory, values unchanged, so only the dtype shows it); ours gives each its saved dtype back."""
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = AdamW8bit([p])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    dtypes = {k: t.dtype for k, t in opt2.state[p].items() if torch.is_tensor(t)}
    assert dtypes == {"m_codes": torch.uint8, "v_codes": torch.uint8, "m_absmax": torch.float32,
                      "v_absmax": torch.float32}
    assert opt2.state_bytes() == opt.state_bytes()


def _lora_like(seed=0, shapes=((8, 576), (576, 8), (8, 576), (192, 8), (300, 257), (1000,), (64, 130))):
    """Adapter-like tensors: 8-bit ones with and without a partial last block, fp32-state ones."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def _steps(opt, params, n, seed=1, skip=None):
    """n steps of seeded gradients; skip: {step: index of a parameter that gets no gradient then}."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        for j, p in enumerate(params):
            p.grad = None if (skip or {}).get(i) == j else torch.randn(p.shape, generator=g) * 1e-2
        opt.step()


def test_runs_of_many_tensors_update_as_each_tensor_alone(monkeypatch):
    """A run updates its tensors as one flat tensor; since every slot is whole blocks and the update is
    element- and block-wise, that is bit for bit what each tensor gets alone (one optimizer per tensor),
    gradients missing on some steps included (that tensor stays, and its step count too)."""
    import optim
    skip = {2: 1, 3: 4, 5: 0}
    together = _lora_like()
    opt = AdamW8bit(together, lr=1e-2, weight_decay=0.1)
    _steps(opt, together, 8, skip=skip)
    alone = _lora_like()
    opts = [AdamW8bit([p], lr=1e-2, weight_decay=0.1) for p in alone]

    class Each:   # steps each tensor's own optimizer; runs of one tensor (CHUNK 1) inside each as well
        def step(self):
            for o in opts:
                o.step()
    monkeypatch.setattr(optim, "CHUNK", 1)
    _steps(Each(), alone, 8, skip=skip)
    for a, b, o in zip(together, alone, opts):
        assert torch.equal(a, b)
        for k, t in o.state[b].items():
            assert torch.equal(torch.as_tensor(opt.state[a][k]), torch.as_tensor(t)), k


def test_a_step_costs_the_same_operations_for_10_or_400_tensors():
    """The work of a step does not grow with the number of tensors (on a GPU each operation is a kernel
    launch): the operations the step calls, counted with torch.profiler, views and no-op casts aside
    (one _foreach_copy_ puts the parameters back; on CPU it loops inside, on CUDA it is fused)."""
    from torch.profiler import profile
    views = ("view", "reshape", "slice", "as_strided", "alias", "detach", "unsqueeze", "select", "to", "t")

    def ops(n):
        ps = [torch.nn.Parameter(torch.randn(8, 576)) for _ in range(n)]   # 8-bit states, as LoRA's A
        opt = AdamW8bit(ps, lr=1e-3)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        with profile() as prof:
            opt.step()
        called = [e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name.startswith("Optimizer.step")]
        return sum(1 for name in called if name.startswith("aten::") and name[6:].rstrip("_") not in views)
    few, many = ops(10), ops(400)
    print(f"operations per step: {few} for 10 tensors, {many} for 400")
    assert many == few < 60, (few, many)   # one update per tensor: 46 operations per tensor


def test_default_models_adapters_are_three_runs():
    """The default model's LoRA adapters at r=8 (420 tensors, 2.4M parameters) update in 3 runs."""
    import optim
    shapes = [(8, i) for i in (576,) * 7] + [(o, 8) for o in (576, 192, 192, 576, 1536, 1536, 576)]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _ in range(30) for s in shapes]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    runs = opt._runs()
    assert sum(len(r[2]) for r in runs) == 420 and len(runs) == 3, [len(r[2]) for r in runs]
    assert all(sum(opt.slots[p][2] for p in r[2]) <= optim.CHUNK for r in runs)


def test_state_dict_tensors_share_no_storage(tmp_path):
    """The per-tensor states are views of the flat buffers; state_dict gives each its own storage, so
    the checkpoint (safetensors, which refuses aliased tensors) can hold them."""
    from safetensors.torch import load_file, save_file
    ps = _lora_like()
    opt = AdamW8bit(ps)
    _steps(opt, ps, 2)
    flat = {f"{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    save_file(flat, tmp_path / "s.safetensors")
    back = load_file(tmp_path / "s.safetensors")
    assert all(torch.equal(back[k], v) for k, v in flat.items())


def test_paged_device_bytes_are_two_runs():
    """Paged, the device holds the run being updated and the one prefetched: for three 8-bit tensors of
    half a run each, runs of 2 and 1 tensors; unpaged, every state."""
    import optim
    from optim import device_state_bytes, slot_bytes
    half = optim.CHUNK // 2
    assert device_state_bytes([half] * 3, paged=True) == slot_bytes("8bit", 2 * half) + slot_bytes("8bit", half)
    assert device_state_bytes([half] * 3 + [100]) == 3 * (2 * half + 8 * half // 256) + 8 * 100
    assert device_state_bytes([300]) == 8 * 300   # fp32 states under 4096 elements: 8 bytes each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paging needs CUDA")
def test_paged_on_cuda_moves_runs_not_tensors(monkeypatch):
    """420 adapter-sized tensors: a step copies each run's state buffers to the GPU and back (4 for 8-bit
    runs, 2 for fp32 ones) instead of 4 each way per tensor; the result equals unpaged."""
    shapes = [(8, 576), (576, 8), (8, 576), (192, 8), (8, 1536), (576, 8)] * 70
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    paged, plain = AdamW8bit(ps, lr=1e-3, paged=True), AdamW8bit(qs, lr=1e-3)
    moved, to, copy_ = [], torch.Tensor.to, torch.Tensor.copy_

    def spy_to(t, *a, **k):
        out = to(t, *a, **k)
        moved.extend([1] if out.device != t.device else [])
        return out

    def spy_copy(t, src, *a, **k):
        moved.extend([1] if t.device != src.device else [])
        return copy_(t, src, *a, **k)
    for step in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p) * 1e-3
            q.grad = p.grad.clone()
        if step == 2:
            monkeypatch.setattr(torch.Tensor, "to", spy_to)
            monkeypatch.setattr(torch.Tensor, "copy_", spy_copy)
        paged.step()
        monkeypatch.undo()
        plain.step()
    runs = paged._runs()
    assert len(moved) == sum(8 if kind == "8bit" else 4 for _, kind, _ in runs) < 40, len(moved)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
