"""Storage floor: packed low-bit formats.  Imports only torch (and numpy/scipy for the codebook optimiser)."""

from .base import Format, QuantizedTensor, check_weight
from .codebook_format import CodebookFormat
from .integer import IntegerFormat
from .packing import pack_codes, packed_width, unpack_codes
from .registry import FORMATS, get_format

__all__ = [
    "FORMATS",
    "CodebookFormat",
    "Format",
    "IntegerFormat",
    "QuantizedTensor",
    "check_weight",
    "get_format",
    "pack_codes",
    "packed_width",
    "unpack_codes",
]
