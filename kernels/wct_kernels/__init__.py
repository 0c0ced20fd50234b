"""``wct.kernels``: the quantized-matmul custom op (``torch.ops.wct.quant_linear``) and its backends.

Math floor: sees packed tensors and activations, nothing about PEFT or solvers.
"""

from .autograd import layout_of, quant_linear, quant_linear_raw
from .spec import PackedWeight

__all__ = ["PackedWeight", "layout_of", "quant_linear", "quant_linear_raw"]
