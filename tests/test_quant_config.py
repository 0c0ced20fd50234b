"""QuantConfig refuses options that would be silently ignored or buy nothing."""

import pytest

from wct.quantize import QuantConfig


def test_owq_without_target_bits_warns_and_uses_wbits_plus_a_hundredth():
    with pytest.warns(UserWarning, match="target_bits not given, using 3.01"):
        cfg = QuantConfig(method="owq", wbits=3)
    assert cfg.target_bits == pytest.approx(3.01)


@pytest.mark.parametrize("target", [3.0, 2.5])
def test_owq_target_bits_at_or_below_wbits_is_refused(target):
    with pytest.raises(ValueError, match="must be above wbits=3"):
        QuantConfig(method="owq", wbits=3, target_bits=target)


@pytest.mark.parametrize("method", ["nf4", "bof4s", "gptq", "rtn", "gwq"])
def test_target_bits_outside_owq_is_refused_by_name(method):
    with pytest.raises(ValueError, match=f"not to .*{method!r}"):
        QuantConfig(method=method, target_bits=4.5)


def test_wbits_with_a_codebook_is_refused():
    with pytest.raises(ValueError, match="4-bit codebook, wbits=3 does not apply"):
        QuantConfig(method="nf4", wbits=3)
    assert QuantConfig(method="nf4").wbits == 4
