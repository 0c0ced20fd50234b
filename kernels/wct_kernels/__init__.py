"""``wct.kernels``: the quantized-matmul autograd function and its backends.

Math floor: sees packed tensors and activations, nothing about PEFT or solvers.
"""

from .autograd import QuantLinearFunction, quant_linear
from .spec import PackedWeight

__all__ = ["PackedWeight", "QuantLinearFunction", "quant_linear"]
