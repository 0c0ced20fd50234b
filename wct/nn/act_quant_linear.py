"""``ActQuantLinear``: a Linear whose weights *and* inputs are integers (W8A8, W6A6, ...).

Why a second Linear class next to :class:`~wct.nn.QuantLinear`: ``QuantLinear`` keeps
activations in floating point (weight-only quantization); here the matmul itself runs
on integers, so the layer also owns the activation quantizer.

The computation, for an input row ``x`` (one token)::

    x̃  = (x − shift) / scale              per input channel (optional; see below)
    q   = clamp(round(x̃ / s_x), −qa, qa)   s_x = 1 (static), max|x̃ row| / qa (per-token)
                                           or max|x̃ sequence| / qa (per-tensor)
    y   = (q · Cᵀ) ⊙ s_w · s_x + bias      C: int8 weight codes, s_w: one scale per output row

The per-channel ``(shift, scale)`` pair is what makes per-*channel* activation
quantization cheap (OutlierTune's "pre-execution of dequantization"): the layer was
built from ``W' = W·diag(scale)`` and ``b' = b + W·shift`` (:func:`fold_channel_transform`),
so no per-channel factor is left inside the integer matmul, only the per-row weight
scale.  With ``act_mode="static"`` the channel scale *is* the quantization step
(``Δ_c = range_c / qa``) and ``s_x = 1``; with a dynamic mode the channel scale is a
SmoothQuant-style smoothing factor.  In a deployment ``1/scale`` and ``shift/scale``
fold into the preceding norm's γ and β; here they are one fused multiply-add
(``x·(1/scale) − shift/scale``, :meth:`ActQuantLinear.transform_input`), which costs the same
and also works after a bias-free RMSNorm.

Integer execution (``backend``):

* ``"int_mm"``: ``torch._int_mm`` (int8×int8→int32).  Used automatically on CUDA when the
  shapes allow it (more than 16 rows, K and N multiples of 8).  It exists on CPU too, but
  in torch 2.13 it is a naive kernel ~10× slower than the fp32 matmul, so it is never
  chosen automatically there.
* ``"fbgemm"``: PyTorch's x86 int8 GEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``,
  u8 activations × s8 weights → s32 → fp32).  Used automatically on CPU.  On AVX2 without
  VNNI, fbgemm multiplies with ``vpmaddubsw``, which *saturates* the int16 sum of two
  adjacent u8·s8 products; a u8 activation above 127 can overflow it.  So the layer only
  feeds it u8 values ≤ 127, which makes the result exact:
  activations of ≤ 7 bits are sent once with zero point 64 (``q + 64 ∈ [1, 127]``);
  8-bit activations are split by sign, ``q = q⁺ − q⁻`` with ``q± ∈ [0, 127]``, and sent as
  one GEMM of width 2K against ``[C, −C]`` (twice the int8 weight bytes: an AVX2 tax
  that VNNI machines would not pay).  PyTorch's own answer is ``reduce_range`` (7-bit
  activations), which changes the numbers; we keep them exact instead.
* ``"simulate"``: the same integers through a floating-point matmul, exact because every
  partial sum is an integer below 2^24 (fp32) or 2^53 (fp64, used when
  ``K·qa·qw ≥ 2^24``, e.g. ``K = 1536`` at W8A8).

All three return bit-identical outputs (tested on CPU, including .5 rounding ties; the
epilogue ``acc·s_w + bias`` is one fused multiply-add everywhere, as in fbgemm), so accuracy
numbers do not depend on which path ran.  Measured on this 2-core AVX2 machine (SmolLM2-135M,
1 thread, batch 1): 6-bit activations beat the fp32 model (decode ~1.06×, 512-token prefill
~1.28×); the 8-bit split path does not (~0.87× / ~0.86×); see ``docs/benchmarks/actquant.md``.  Everything that defines the layer is a buffer (state-dict
friendly); backend caches (fbgemm packed weights) are rebuilt lazily.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

ACT_MODES = ("static", "per-token", "per-tensor")
BACKENDS = ("auto", "simulate", "fbgemm", "int_mm")
MIN_BITS, MAX_BITS = 4, 8
_EPS = 1e-8  # smallest dynamic activation scale: an all-zero row quantizes to zeros, not NaN
_FP32_EXACT = 2**24


def qmax(bits: int) -> int:
    """Largest code of a symmetric ``bits``-bit grid ``[−qmax, qmax]`` (127 for 8 bits, 31 for 6)."""
    return 2 ** (bits - 1) - 1


def check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}={bits!r} is not supported: integer activation/weight quantization here covers "
            f"{MIN_BITS} to {MAX_BITS} bits (int8 storage and int8 matmuls)"
        )


# --- pure math, shared with the calibration code ------------------------------------------------
def fold_channel_transform(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` such that ``W'·((x − shift)/scale) + b' == W·x + b`` exactly (in exact arithmetic).

    ``W' = W·diag(scale)`` is the pre-executed dequantization; ``b' = b + W·shift`` is the
    symmetrization fold (a bias is created when the Linear had none).
    """
    W = weight
    b = bias
    if shift is not None:
        wz = W @ shift.to(W.dtype)
        b = wz if b is None else b.to(W.dtype) + wz
    if scale is not None:
        W = W * scale.to(W.dtype)[None, :]
    return W, b


def channel_transform(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``(x − shift) / scale`` per input channel (either may be None)."""
    if shift is not None:
        x = x - shift.to(x.dtype)
    if scale is not None:
        x = x / scale.to(x.dtype)
    return x


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max (absmax) quantization per output row: ``(int8 codes, fp32 scales)``.

    Symmetric because the integer GEMM then needs no weight zero point (fbgemm / ``_int_mm``
    take plain int8 weights); 6-bit codes are stored in int8 too.
    """
    q = qmax(bits)
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / q).clamp(min=_EPS)
    codes = torch.clamp(torch.round(w / scale[:, None]), -q, q).to(torch.int8)
    return codes, scale


@functools.lru_cache(maxsize=1)
def _fbgemm_available() -> bool:
    try:
        return hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32") and any(
            e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")
        )
    except Exception:  # pragma: no cover - builds without quantized ops
        return False


class ActQuantLinear(nn.Module):
    """Integer Linear with a per-row weight scale and a static or dynamic activation quantizer.

    Buffers: ``qweight`` int8 ``[out, in]``, ``wscale`` fp32 ``[out]``, optional ``bias``
    fp32 ``[out]``, optional ``act_scale`` / ``act_shift`` fp32 ``[in]`` (the per-channel
    input transform).  ``act_mode="static"`` needs ``act_scale`` (the calibrated step).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        wbits: int = 8,
        abits: int = 8,
        act_mode: str = "per-token",
        bias: bool = False,
        channel_scale: bool = False,
        channel_shift: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """Empty layer of the right shapes (to load a checkpoint into); use :meth:`from_float` to build one."""
        super().__init__()
        check_bits("wbits", wbits)
        check_bits("abits", abits)
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        if act_mode == "static" and not channel_scale:
            raise ValueError("act_mode='static' needs a calibrated per-channel act_scale (channel_scale=True)")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.wbits, self.abits, self.act_mode = int(wbits), int(abits), act_mode
        self.backend = "auto"
        self.quantize_input = True  # False: skip activation rounding (to measure the weight-only error)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # NaN until calibrated or loaded: a static layer that was never calibrated refuses to run
        nan = torch.full((in_features,), float("nan"), device=device)
        self.register_buffer("act_scale", nan.clone() if channel_scale else None)
        self.register_buffer("act_shift", torch.zeros(in_features, device=device) if channel_shift else None)
        self._cache: dict[str, Any] = {}

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        wbits: int = 8,
        abits: int = 8,
        act_mode: str = "per-token",
        act_scale: torch.Tensor | None = None,
        act_shift: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        wscale: torch.Tensor | None = None,
    ) -> "ActQuantLinear":
        """Fold the channel transform into ``weight [out, in]`` / ``bias`` and quantize per row.

        ``codes``/``wscale``: already solved integer weights of the *folded* weight (e.g. GPTQ);
        by default the folded weight is rounded to nearest on a symmetric min-max grid.
        """
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out, in], got {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        for name, t in (("act_scale", act_scale), ("act_shift", act_shift)):
            if t is not None and tuple(t.shape) != (in_f,):
                raise ValueError(f"{name} must have shape ({in_f},), got {tuple(t.shape)}")
        if act_scale is not None:
            act_scale = act_scale.detach().float()
            if not bool(torch.isfinite(act_scale).all()) or bool((act_scale <= 0).any()):
                raise ValueError("act_scale must be finite and positive in every channel")
        if act_shift is not None:
            act_shift = act_shift.detach().float()
            if not bool(torch.isfinite(act_shift).all()):
                raise ValueError("act_shift holds NaN/Inf")
        W, b = fold_channel_transform(
            weight.detach().double(), None if bias is None else bias.detach().double(), act_scale, act_shift
        )
        if codes is None:
            codes, wscale = quantize_rows(W, wbits)
        elif wscale is None or tuple(codes.shape) != (out_f, in_f) or tuple(wscale.shape) != (out_f,):
            raise ValueError(f"codes must be [{out_f}, {in_f}] with wscale [{out_f}]")
        elif int(codes.abs().max()) > qmax(wbits):
            raise ValueError(f"codes exceed the {wbits}-bit range ±{qmax(wbits)}")
        layer = cls(
            in_f, out_f, wbits=wbits, abits=abits, act_mode=act_mode, bias=b is not None,
            channel_scale=act_scale is not None, channel_shift=act_shift is not None, device=weight.device,
        )
        layer.qweight.copy_(codes.to(torch.int8))
        layer.wscale.copy_(wscale.float())
        if b is not None:
            layer.bias.copy_(b.float())
        if act_scale is not None:
            layer.act_scale.copy_(act_scale)
        if act_shift is not None:
            layer.act_shift.copy_(act_shift)
        return layer

    def spec(self) -> dict[str, Any]:
        """JSON description of the layer (everything but the numbers), for checkpoints."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "wbits": self.wbits,
            "abits": self.abits, "act_mode": self.act_mode, "bias": self.bias is not None,
            "channel_scale": self.act_scale is not None, "channel_shift": self.act_shift is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> "ActQuantLinear":
        known = ("in_features", "out_features", "wbits", "abits", "act_mode", "bias", "channel_scale", "channel_shift")
        missing = [k for k in ("in_features", "out_features") if k not in spec]
        if missing:
            raise ValueError(f"layer spec lacks {missing}")
        return cls(**{k: spec[k] for k in known if k in spec}, device=device)

    # --- views ------------------------------------------------------------------------------------
    @property
    def qa(self) -> int:
        return qmax(self.abits)

    @property
    def qw(self) -> int:
        return qmax(self.wbits)

    def dequantize_weight(self) -> torch.Tensor:
        """The folded weight ``W' ≈ W·diag(act_scale)`` as fp32 ``[out, in]``."""
        return self.qweight.float() * self.wscale[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers (int8 codes, scales, bias, channel transform)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"w{self.wbits}a{self.abits}", f"act={self.act_mode}"]
        if self.act_scale is not None:
            parts.append("channel_scale")
        if self.act_shift is not None:
            parts.append("channel_shift")
        return ", ".join(parts) + f", bias={self.bias is not None}"

    # --- compute ----------------------------------------------------------------------------------
    # Batch-1 decoding calls each layer once per token, so the hot path is a handful of fused or
    # in-place ops behind one cached "runtime" (validated by buffer versions): at a few µs per op
    # they decide whether int8 beats fp32 at all.  The integer codes are ``round(v)`` of the
    # pre-rounding value ``v`` = ``(x − shift)/scale`` (static) or ``x̃/s_x`` (dynamic); every backend
    # clamps to ``±qa`` and rounds half-to-even (fbgemm rounds internally), so all agree exactly.
    def _runtime(self) -> dict[str, Any]:
        b = self._buffers
        qw, ws, sc, sh = b["qweight"], b["wscale"], b["act_scale"], b["act_shift"]
        key = (self.backend, self.act_mode, self.abits, qw.data_ptr(), qw._version, ws._version,
               None if sc is None else (sc.data_ptr(), sc._version), None if sh is None else (sh.data_ptr(), sh._version),
               None if b["bias"] is None else (b["bias"].data_ptr(), b["bias"]._version))
        rt = self._cache.get("runtime")
        if rt is not None and rt["key"] == key:
            return rt
        if self.act_mode == "static" and (not bool(torch.isfinite(sc).all()) or bool((sc <= 0).any())):
            raise ValueError(
                "ActQuantLinear with act_mode='static' has no calibrated activation scales (act_scale holds "
                "NaN/non-positive values): calibrate it with wct.actquant.quantize_activations or "
                "load a checkpoint into it"
            )
        inv = off = None
        if sc is not None or sh is not None:
            ones = torch.ones(self.in_features, device=qw.device)
            inv = ones / sc if sc is not None else ones
            off = -sh * inv if sh is not None else torch.zeros_like(inv)
        rt = {"key": key, "inv": inv, "off": off, "backend": self.resolved_backend(), "gemm": None}
        if rt["backend"] == "fbgemm":
            rt["gemm"] = self._fbgemm_fn(with_bias=self.act_mode == "static")
        self._cache["runtime"] = rt
        return rt

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − shift)/scale`` in fp32, computed as one multiply-add ``x·(1/scale) − shift/scale``."""
        rt = self._runtime()
        x = x.float()
        return x if rt["inv"] is None else torch.addcmul(rt["off"], x, rt["inv"])

    def quantize_input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Integer-valued fp32 codes ``q`` of the transformed input and the dynamic scale ``s_x`` (None if static).

        ``x2`` is ``[rows, in]`` (per-token) or ``[sequences, tokens, in]`` (per-tensor).
        """
        v, sx = self._pre_round(x2)
        return torch.round(v).clamp_(-self.qa, self.qa), sx

    def _pre_round(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.act_mode == "static":
            return x2, None
        dims = -1 if self.act_mode == "per-token" else (-2, -1)
        sx = x2.abs().amax(dim=dims, keepdim=True).div_(self.qa).clamp_(min=_EPS)
        return torch.div(x2, sx), sx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        lead = x.shape[:-1]
        rt = self._runtime()
        xt = x.float() if rt["inv"] is None else torch.addcmul(rt["off"], x.float(), rt["inv"])
        xt = xt.reshape(-1, self.in_features)
        bias = self._buffers["bias"]
        if not self.quantize_input:
            y = xt @ self.dequantize_weight().t()
            y = y if bias is None else y.add_(bias)
        elif self.act_mode == "static":
            y = self._gemm(xt, bias, rt)  # the bias rides in the GEMM epilogue
        else:
            if self.act_mode == "per-tensor":  # one scale per sequence: batching never changes the result
                xt = xt.reshape(lead[0] if len(lead) >= 2 else 1, -1, self.in_features)
            v, sx = self._pre_round(xt)
            y = self._gemm(v.reshape(-1, self.in_features), None, rt).reshape(sx.shape[0], -1, self.out_features) \
                if self.act_mode == "per-tensor" else self._gemm(v, None, rt)
            y = y.mul_(sx) if bias is None else torch.addcmul(bias, y, sx)
        y = y.reshape(*lead, self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    # --- integer GEMM backends: fp32(acc)·wscale (+ bias), bit-identical ---------------------------
    def resolved_backend(self, rows: int | None = None) -> str:
        """The backend ``auto`` picks on this device (see the module docstring)."""
        if self.backend != "auto":
            if self.backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
            return self.backend
        if self.qweight.is_cuda:
            shapes_ok = self.in_features % 8 == 0 and self.out_features % 8 == 0 and (rows is None or rows > 16)
            return "int_mm" if shapes_ok else "simulate"
        if self.qweight.device.type == "cpu" and _fbgemm_available():
            return "fbgemm"
        return "simulate"

    def _gemm(self, v: torch.Tensor, bias: torch.Tensor | None, rt: dict[str, Any]) -> torch.Tensor:
        """``fp32(round(clamp(v))·Cᵀ)·wscale (+ bias)`` for pre-rounding values ``v [rows, in]``."""
        if rt["gemm"] is not None:  # fbgemm: clamps, rounds and adds the (static-mode) bias itself
            return rt["gemm"](v)
        backend = rt["backend"] if self.backend != "auto" else self.resolved_backend(v.shape[0])
        q = torch.round(v).clamp_(-self.qa, self.qa)
        if backend == "int_mm":
            acc = torch._int_mm(q.to(torch.int8), self.qweight.t()).float()
        else:
            acc = self._acc_simulate(q)
        return acc.mul_(self.wscale) if bias is None else torch.addcmul(bias, acc, self.wscale)

    def _acc_simulate(self, q: torch.Tensor) -> torch.Tensor:
        exact_fp32 = self.in_features * self.qa * self.qw < _FP32_EXACT
        tf32 = q.is_cuda and torch.backends.cuda.matmul.allow_tf32
        dt = torch.float32 if exact_fp32 and not tf32 else torch.float64
        return (q.to(dt) @ self.qweight.to(dt).t()).float()

    def _fbgemm_fn(self, with_bias: bool):
        """A closure running fbgemm on pre-rounding values (with scale 1 and zero point 0 it rounds them itself)."""
        qa = self.qa
        split = qa > 63  # 8-bit: split by sign so every u8 operand stays ≤ 127 (module docstring)
        codes = torch.cat([self.qweight, -self.qweight], dim=1) if split else self.qweight
        bias = self.bias.float().contiguous() if with_bias and self.bias is not None else None
        with warnings.catch_warnings():  # quantized-tensor constructors warn about a future deprecation
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                codes.contiguous(), self.wscale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(qw, bias)
        op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
        if split:
            return lambda v: op(torch.cat([v, v.neg()], dim=1).clamp_(0, qa), 1.0, 0, packed)
        # rounded here: fbgemm would round v + 64, and adding 64 in fp32 can move a value off a .5 tie
        return lambda v: op(v.clamp(-qa, qa).round_(), 1.0, 64, packed)  # q + 64 ∈ [64 − qa, 64 + qa] ⊂ [1, 127]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / deepcopy without the backend cache (fbgemm packed weights are rebuilt lazily)."""
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state
