"""FSDP2 over packed layers (issue #22), on CPU: 2 processes over gloo, a tiny Llama.

One ``torch.multiprocessing`` launch runs every distributed check (process start-up and imports are most of the
cost); rank 0 writes what it measured to a JSON file that the tests below read.  Single-process tests of the
storage itself come first.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

import wct
from wct.formats import get_format
from wct.nn import QuantLinear

WORLD = 2
SEQ, GLOBAL_BATCH = 16, 4


# ---------------------------------------------------------------------------------------------------------------------
# storage (one process)
# ---------------------------------------------------------------------------------------------------------------------
def _layer(fmt: str = "int3", seed: int = 0, **kw) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(96, 40, bias=True)
    mask = torch.rand(40, 96) < 0.03
    return QuantLinear.from_linear(lin, get_format(fmt, **kw), weak_columns=torch.tensor([3, 50]), outlier_mask=mask)


def test_packed_storage_is_frozen_parameters_with_the_same_state_dict():
    layer = _layer()
    params = dict(layer.named_parameters())
    assert set(params) == {*layer._base_names, "col_values", "sp_cols", "sp_values", "bias"}
    assert not any(p.requires_grad for p in params.values())
    assert {n for n, _ in layer.named_buffers()} == {"col_idx", "sp_rowptr"}  # structure indices stay whole
    sd = layer.state_dict()
    assert set(sd) == {n for n, _ in layer.named_storage()}
    assert sd["qweight"].dtype == torch.int32 and sd["scales"].dtype == torch.float16
    # an optimizer over model.parameters() that skips frozen tensors (what Trainer does) gets nothing from it
    assert not [p for p in layer.parameters() if p.requires_grad]


def test_model_half_does_not_cast_packed_parameters():
    layer = _layer("nf4")
    before = {n: t.clone() for n, t in layer.named_storage()}
    layer.half()
    layer.to(torch.bfloat16)
    for n, t in layer.named_storage():
        assert t.dtype == before[n].dtype and torch.equal(t.view(torch.uint8), before[n].view(torch.uint8)), n


def test_a_cast_packed_tensor_is_refused_at_forward():
    layer = _layer()
    layer._parameters["scales"] = nn.Parameter(layer.scales.to(torch.bfloat16), requires_grad=False)
    with pytest.raises(TypeError, match="storage 'scales' arrived as torch.bfloat16"):
        layer(torch.randn(2, 96))


def test_peft_parameter_count_counts_packed_layers_as_their_weights():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    dense_total = sum(p.numel() for p in model.parameters())
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    wct.quantize_model(model, wct.QuantConfig(method="owq", wbits=3, target_bits=3.5), calibration=calib,
                       progress=False)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad) > 0
    assert total == dense_total + trainable  # the dense model's weights plus the adapter


# ---------------------------------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nan_patterns(t: torch.Tensor, gen: torch.Generator) -> None:
    """Fill ``t``'s bytes with random bits, half of its 16-bit words NaN payloads in fp16 *and* bf16 (0xFF81 ...)."""
    raw = t.data.view(torch.uint8).view(-1)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    if raw.numel() >= 2:
        words = t.data.view(-1).view(torch.uint8)[: raw.numel() // 2 * 2].view(torch.int16)
        nan16 = torch.tensor([0x7F81, 0x7FC1, -127, -63], dtype=torch.int16)  # 0x7f81 0x7fc1 0xff81 0xffc1
        words[::2] = nan16[torch.randint(0, 4, words[::2].shape, generator=gen)]


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _adapter(kind: str, base_dir: str):
    from peft import LoraConfig, get_peft_model

    model = wct.load_quantized(base_dir)
    cfg = (LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) if kind == "lora"
           else wct.WCTConfig())
    torch.manual_seed(1)
    return get_peft_model(model, cfg)


def _sgd_step(model, ids: torch.Tensor, lr: float = 0.05) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def _params_to_bf16(model: nn.Module) -> nn.Module:
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes with: float parameters in bf16 (buffers such as
    rotary frequencies stay fp32), packed layers as stored."""
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    return model


def _worker(rank: int, world: int, port: int, base_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from wct.integrations.fsdp import full_state_dict, packed_bytes_per_rank, shard_model, shard_packed_layers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict = {}
    try:
        # 1. bytes: every packed tensor of several formats, filled with NaN bit patterns, sharded and gathered back
        gen = torch.Generator().manual_seed(0)
        layers = nn.ModuleList([_layer("int3"), _layer("int4", group_size=32, partial_groups=True), _layer("bof4s"),
                                _layer("nf4"), _layer("int8", sym=True)])
        for layer in layers:
            for _, t in layer.named_storage():
                if t.dtype.is_floating_point or t.dtype == torch.int32 and t.dim() == 2:  # values and codes
                    _nan_patterns(t, gen)
        ref = copy.deepcopy(layers)
        shard_packed_layers(layers)
        local_ratio = []
        for layer, r in zip(layers, ref):
            held = {n: t for n, t in layer.named_parameters(recurse=False)}
            assert all(hasattr(t, "to_local") for t in held.values()), "a packed parameter was not sharded"
            local = sum(t.to_local().numel() * t.element_size() for t in held.values())
            local_ratio.append(local / sum(t.numel() * t.element_size() for t in held.values()))
            layer.unshard()
            for n, t in layer.named_storage():
                assert _bytes_equal(t, getattr(r, n)), f"{r.fmt.name}: {n} changed in the all-gather"
            layer.reshard()
        report["layer_local_ratio"] = local_ratio

        # 2. a whole model: forward equal to the unsharded one, with and without a bf16 policy on the blocks
        ids = _batch()
        base = wct.load_quantized(base_dir)
        with torch.no_grad():
            want = base(input_ids=ids).logits
            want16 = _params_to_bf16(copy.deepcopy(base))(input_ids=ids).logits
        full_bytes = packed_bytes_per_rank(base)["local"]
        model = shard_model(copy.deepcopy(base))
        per_rank = packed_bytes_per_rank(model)
        report["model_packed_bytes"] = {"unsharded": full_bytes, "rank_local": per_rank["local"]}
        with torch.no_grad():
            got = model(input_ids=ids).logits
        report["forward_max_abs_diff"] = float((got - want).abs().max())
        assert torch.equal(got, want), report["forward_max_abs_diff"]
        model16 = shard_model(copy.deepcopy(base), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        with torch.no_grad():
            got16 = model16(input_ids=ids).logits
        report["bf16_forward_max_abs_diff"] = float((got16.float() - want16.float()).abs().max())
        assert torch.equal(got16, want16), report["bf16_forward_max_abs_diff"]
        bad = copy.deepcopy(base)  # blocks sharded with a casting policy, packed layers not given their own group
        for block in bad.model.layers:
            fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        fully_shard(bad)
        try:
            with torch.no_grad():
                bad(input_ids=ids)
            report["cast_refused"] = False
        except TypeError as e:
            report["cast_refused"] = "arrived as torch.bfloat16" in str(e)

        # 3. one training step on the global batch split over the ranks == one process on the whole batch
        mine = ids.chunk(world)[rank]
        for kind in ("wct", "lora"):
            single = _adapter(kind, base_dir)
            sharded = shard_model(_adapter(kind, base_dir))
            init = {n: p.detach().clone() for n, p in single.named_parameters() if p.requires_grad}
            want_loss = _sgd_step(single, ids)
            loss = torch.tensor(_sgd_step(sharded, mine))
            dist.all_reduce(loss)
            got_params = {n: _full(p.detach()) for n, p in sharded.named_parameters() if p.requires_grad}
            want_params = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
            assert set(got_params) == set(want_params) and got_params
            diff = max(float((got_params[n] - want_params[n]).abs().max()) for n in want_params)
            moved = max(float((want_params[n] - p0).abs().max()) for n, p0 in init.items())
            report[f"{kind}_step"] = {"loss_1proc": want_loss, "loss_2proc": float(loss) / world,
                                      "max_param_diff": diff, "max_update": moved}
            assert abs(float(loss) / world - want_loss) < 1e-5
            for n in want_params:
                torch.testing.assert_close(got_params[n], want_params[n], rtol=1e-5, atol=1e-6, msg=n)

            # 4. the full state from the sharded run: packed base bit-exact, adapter equal; saved on rank 0
            full = full_state_dict(sharded)
            if rank == 0:
                ref_sd = single.state_dict()
                assert set(full) == set(ref_sd)
                for k, v in ref_sd.items():
                    if v.dtype.is_floating_point and k in {f"{n}" for n in want_params}:
                        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6)
                    else:
                        assert _bytes_equal(full[k], v), k
                wct.save_pretrained(sharded, Path(out) / f"{kind}-sharded", state_dict=full)
                wct.save_pretrained(single, Path(out) / f"{kind}-single")
            dist.barrier()

        # 5. resume: sharded model + optimizer state through torch.distributed.checkpoint, losses identical
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        def fresh():
            m = shard_model(_adapter("wct", base_dir))
            return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def step(m, opt, seed):
            b = _batch(seed).chunk(world)[rank]
            m.train()
            loss = m(input_ids=b, labels=b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            t = loss.detach().clone()
            dist.all_reduce(t)
            return float(t) / world

        m, opt = fresh()
        step(m, opt, 1)
        msd, osd = get_state_dict(m, opt)
        ckpt = str(Path(out) / "dcp")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        cont = [step(m, opt, s) for s in (2, 3)]
        m2, opt2 = fresh()
        msd2, osd2 = get_state_dict(m2, opt2)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(m2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        resumed = [step(m2, opt2, s) for s in (2, 3)]
        report["resume"] = {"continued": cont, "resumed": resumed}
        assert cont == resumed
    finally:
        if rank == 0:
            Path(out, "report.json").write_text(json.dumps(report, indent=1))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    import time

    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    model = make_tiny_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    # OWQ 3-bit: packed codes, fp16 scales, int32 zeros and 16-bit weak columns in every layer
    wct.quantize_model(model, wct.QuantConfig(method="owq", wbits=3, target_bits=3.5), calibration=calib,
                       progress=False)
    wct.save_pretrained(model, root / "base")
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(WORLD, _free_port(), str(root / "base"), str(root)), nprocs=WORLD, join=True)
    report = json.loads((root / "report.json").read_text())
    report["seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=1))
    return root, report


def test_each_rank_holds_half_of_every_packed_tensor(fsdp_run):
    _, rep = fsdp_run
    assert all(0.45 <= r <= 0.56 for r in rep["layer_local_ratio"]), rep["layer_local_ratio"]
    mb = rep["model_packed_bytes"]
    assert 0.45 <= mb["rank_local"] / mb["unsharded"] <= 0.56, mb  # the index buffers stay whole: a bit above 1/2


def test_sharded_forward_is_bit_identical_and_casts_are_refused(fsdp_run):
    _, rep = fsdp_run
    assert rep["forward_max_abs_diff"] == 0.0 and rep["bf16_forward_max_abs_diff"] == 0.0
    assert rep["cast_refused"] is True


@pytest.mark.parametrize("kind", ["wct", "lora"])
def test_two_process_step_equals_one_process_and_saves_the_same_adapter(fsdp_run, kind):
    from safetensors.torch import load_file

    root, rep = fsdp_run
    step = rep[f"{kind}_step"]
    assert step["max_update"] > 100 * max(step["max_param_diff"], 1e-9)  # the step moved the adapter, equally
    a = load_file(root / f"{kind}-sharded" / "adapter_model.safetensors")
    b = load_file(root / f"{kind}-single" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the adapter from the sharded run loads, and merging it gives a valid packed checkpoint
    loaded = wct.load_adapter(wct.load_quantized(root / "base"), root / f"{kind}-sharded")
    merged = loaded.merge_and_unload()
    wct.sync_quantization(merged)
    wct.save_pretrained(merged, root / f"{kind}-merged")
    again = wct.load_quantized(root / f"{kind}-merged")
    ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=0)


def test_resume_from_a_sharded_checkpoint_continues_with_identical_losses(fsdp_run):
    _, rep = fsdp_run
    assert rep["resume"]["continued"] == rep["resume"]["resumed"]


def test_loaded_packed_parameters_are_frozen(fsdp_run):
    """transformers re-creates loaded float parameters with requires_grad=True; the wct quantizer freezes them."""
    root, _ = fsdp_run
    model = wct.load_quantized(root / "base")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(p.requires_grad for m in layers for p in m.parameters())
    assert all(m.scales.dtype == torch.float16 for m in layers)
