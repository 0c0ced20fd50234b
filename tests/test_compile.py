"""``torch.ops.wct.quant_linear`` as one opaque op: its math, its autograd, and ``torch.compile``.

* the op against independent references: dense ``x @ W.T`` with torch autograd (``W`` the
  dequantized weight plus outliers), ``gradcheck`` in float64, and ``torch.library.opcheck``
  (schema, fake/meta functions, autograd registration);
* a quantized tiny Llama under ``torch.compile(fullgraph=True)``: zero graph breaks, logits equal
  to eager; one WCT training step (forward, backward, AdamW) compiled with Inductor equal to eager.

Inductor compiles on CPU take tens of seconds, so there is exactly one Inductor test (one step of
a 1-block model); the others use the ``aot_eager`` backend, which runs the same Dynamo capture
and AOTAutograd joint graph with the fake functions, without generating code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from peft import get_peft_model

from wct.formats import get_format
from wct.integrations.peft import register_wct_peft
from wct.integrations.transformers import quantize_model
from wct.kernels import quant_linear_raw
from wct.nn import QuantLinear
from wct.quantize import QuantConfig
from wct.tuners.wct import WCTConfig

CAL = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
BATCH = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    register_wct_peft()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(fmt: str = "int4", weak: tuple = (3, 17), sparse: float = 0.05, **kw) -> QuantLinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    mask = torch.rand(24, 64) < sparse if sparse else None
    return QuantLinear.from_linear(lin, get_format(fmt, **kw), weak_columns=torch.tensor(weak) if weak else None,
                                   outlier_mask=mask)


def _op_args(layer: QuantLinear, x, cv, sv):
    base = [getattr(layer, n) for n in layer._base_names]
    return (x, base, layer._layout,
            layer.col_idx if layer.n_weak else None, cv, layer.sp_rowptr if layer.nnz else None,
            layer.sp_cols if layer.nnz else None, sv)


# =========================================================================== the op itself
@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 32, "partial_groups": True}), ("nf4", {"block_size": 32, "double_quant": True}),
                                    ("int3", {})])
def test_op_forward_and_gradients_match_dense_autograd(fmt, kw):
    """Forward and every gradient (input, weak columns, sparse values, bias) against dense float64 math."""
    layer = _layer(fmt, **kw)
    w_base = layer.dequantize_weight(torch.float64)
    cols, sp = layer.col_idx.long(), layer.sparse_outliers()
    rows, spc = sp.row_index(), layer.sp_cols.long()
    x0 = torch.randn(2, 5, 64, dtype=torch.float64)
    cv0, sv0 = layer.col_values.double(), layer.sp_values.double()
    gy = torch.randn(2, 5, 24, dtype=torch.float64)

    def dense(x, cv, sv, b):
        w = w_base.clone()
        w[:, cols] = cv  # the trainable parts enter the dense weight where the layer keeps them
        w = w.index_put((rows, spc), sv - w_base[rows, spc], accumulate=True)
        return x @ w.t() + layer.bias.double() + b

    def ours(x, cv, sv, b):
        return layer(x, col_values=cv, sparse_values=sv) + b

    grads = []
    for fn in (dense, ours):
        leaves = [t.clone().requires_grad_() for t in (x0, cv0, sv0, torch.zeros(24, dtype=torch.float64))]
        y = fn(*leaves)
        y.backward(gy)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_op_gradcheck_float64():
    layer = _layer("int4", group_size=32, partial_groups=True)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    cv = layer.col_values.double().requires_grad_()
    sv = layer.sp_values.double().requires_grad_()

    def f(x, cv, sv):
        return layer(x, col_values=cv, sparse_values=sv)

    assert torch.autograd.gradcheck(f, (x, cv, sv), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("weak,sparse", [((3, 17), 0.05), ((), 0.0)])
def test_opcheck_schema_fake_and_autograd_registration(weak, sparse):
    """``torch.library.opcheck``: the fake function agrees with the real one, autograd is registered right."""
    layer = _layer("int4", weak=weak, sparse=sparse, group_size=32, partial_groups=True)
    x = torch.randn(4, 64, requires_grad=True)
    cv = layer.col_values.float().requires_grad_() if weak else None
    sv = layer.sp_values.float().requires_grad_() if sparse else None
    torch.library.opcheck(torch.ops.wct.quant_linear.default, _op_args(layer, x, cv, sv))


def test_fake_tensors_give_shape_and_dtype_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _layer("nf4", block_size=32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = quant_linear_raw(*_op_args(layer, torch.empty(2, 7, 64, dtype=torch.bfloat16), layer.col_values,
                                       layer.sp_values))
    assert y.shape == (2, 7, 24) and y.dtype == torch.bfloat16


def test_only_the_input_and_outlier_values_get_gradients():
    layer = _layer("int4", group_size=32, partial_groups=True)
    x = torch.randn(3, 64)  # no grad wanted for the input: no grad_input op runs, no error
    cv = layer.col_values.float().requires_grad_()
    layer(x, col_values=cv, sparse_values=layer.sp_values).sum().backward()
    assert cv.grad is not None and x.grad is None
    assert all(b.grad is None for _, b in layer.named_storage())


@pytest.mark.parametrize("lead", [(3,), (2, 3), (2, 1, 3)])
def test_output_takes_in_place_ops_in_training(lead):
    """The op's output is no view of anything (issue 18: Falcon's ``mlp_output += attention_output`` raised
    "is a view and is being modified inplace"); gradients after the in-place add equal the out-of-place ones."""
    layer = _layer("int4", group_size=32, partial_groups=True)
    x = torch.randn(*lead, 64, requires_grad=True)
    cv = layer.col_values.float().requires_grad_()
    other = torch.randn(*lead, 24)
    grads = []
    for inplace in (False, True):
        y = layer(x, col_values=cv, sparse_values=layer.sp_values)
        assert y._base is None  # FSDP2: an in-place op on a view output would drop its pre-backward hook
        if inplace:
            y += other
        else:
            y = y + other
        x.grad = cv.grad = None
        (y * torch.arange(24.0)).sum().backward()
        grads.append((x.grad.clone(), cv.grad.clone()))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


# =========================================================================== torch.compile
def _quantized(method: str, layers: int = 2) -> torch.nn.Module:
    cfg = {"owq": QuantConfig(method="owq", wbits=4, target_bits=4.25),
           "opq": QuantConfig(method="bof4s", opq=True, opq_quantile=0.9),
           "nf4": QuantConfig(method="nf4")}[method]
    return quantize_model(make_tiny_llama(layers=layers), cfg, calibration=CAL if cfg.calibrated else None,
                          progress=False)


@pytest.mark.parametrize("method", ["opq", "nf4"])  # sparse outliers, plain codebook (weak columns: below)
def test_quantized_llama_has_no_graph_breaks(method):
    explained = torch._dynamo.explain(_quantized(method))(input_ids=BATCH)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_quantized_llama_compiles_fullgraph_and_matches_eager():
    model = _quantized("owq")  # weak columns
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=BATCH).logits, model(input_ids=BATCH).logits,
                                   rtol=1e-5, atol=1e-5)


def _wct_step(model, opt):
    loss = model(input_ids=BATCH, labels=BATCH).loss
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


def _wct_model(base, trainable: str):
    pm = get_peft_model(copy.deepcopy(base), WCTConfig(task_type="CAUSAL_LM", trainable=trainable))
    pm.train()
    return pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)


def _check_step_matches_eager(base, trainable: str, backend: str, steps: int = 1):
    (eager, opt_e), (comp, opt_c) = _wct_model(base, trainable), _wct_model(base, trainable)
    explained = torch._dynamo.explain(comp)(input_ids=BATCH, labels=BATCH)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(comp, backend=backend, fullgraph=True)
    for _ in range(steps):
        loss_e, grads_e = _wct_step(eager, opt_e)
        loss_c, grads_c = _wct_step(compiled, opt_c)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_e and grads_c.keys() == grads_e.keys()
        for name, g in grads_e.items():
            assert g.abs().sum() > 0, f"{name}: no gradient reached a trainable value"
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6)
    params_e = dict(eager.named_parameters())
    for name, p in comp.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, params_e[name], rtol=1e-4, atol=1e-4)


def test_wct_training_step_on_sparse_outliers_compiles_fullgraph():
    _check_step_matches_eager(_quantized("opq"), "outliers", "aot_eager", steps=2)


def test_wct_training_step_compiles_fullgraph_inductor():
    """The real compiler: Inductor generates CPU code around the opaque op; one step equals eager."""
    _check_step_matches_eager(_quantized("owq", layers=1), "weak_columns", "inductor")


def test_derived_indices_are_cached_per_buffer_and_follow_in_place_changes():
    """Kept columns and sparse rows are built once per buffer (a host sync each on a GPU), and rebuilt after
    the buffer changes in place (``load_state_dict`` into the same tensors)."""
    from wct.kernels import autograd as ka
    from wct.outliers import keep_index

    layer = _layer("int4", group_size=32, partial_groups=True)
    args = ([getattr(layer, n) for n in layer._base_names], layer._layout, layer.col_idx, layer.sp_rowptr, layer.sp_cols)
    first, second = ka._packed(*args), ka._packed(*args)
    assert second.keep is first.keep and second.sparse_rows is first.sparse_rows
    layer.col_idx.copy_(torch.tensor([5, 40], dtype=layer.col_idx.dtype))
    third = ka._packed(*args)
    assert torch.equal(third.keep, keep_index(64, torch.tensor([5, 40]))) and third.keep is not first.keep
    assert torch.equal(third.col_idx, torch.tensor([5, 40]))
