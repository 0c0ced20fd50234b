"""Quantization options are defined once (QuantConfig's fields) and reach the CLI and the recipes unchanged."""

import dataclasses

import pytest

from wct.cli import build_parser
from wct.integrations.trl import QuantArguments
from wct.quantize import QuantConfig
from wct.quantize.options import config_from_namespace

# a non-default, valid value for every option (a new option without an entry here fails the first test)
NON_DEFAULT = dict(method="gwq", wbits=3, group_size=32, sym=True, block_size=128, double_quant=True, target_bits=None,
                   owq_sensitivity="hessian", outlier_ratio=0.02, gwq_score="fisher", gwq_solver="rtn", gwq_samples=3,
                   opq=True, opq_quantile=0.9, outlier_dtype="bfloat16", percdamp=0.05, lazy_batch=64, act_order=False,
                   true_sequential=True, range_search="mse", include_lm_head=True, skip_modules=("o_proj", "up_proj"),
                   expert_min_tokens=7, allow_dense=True, calibration_device="cpu")


def test_every_option_has_help_and_a_test_value():
    for f in dataclasses.fields(QuantConfig):
        assert f.metadata.get("help"), f"QuantConfig.{f.name} has no help text"
        assert f.name in NON_DEFAULT, f"QuantConfig.{f.name}: add a non-default value to NON_DEFAULT"


def _cli_argv(values: dict) -> list[str]:
    argv = ["quantize", "--out", "/tmp/unused"]
    for name, v in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + name.replace("_", "-"))
        elif isinstance(v, tuple):
            argv += [flag, *v]
        elif v is not None:
            argv += [flag, str(v)]
    return argv


def test_cli_flags_carry_every_option_into_the_config():
    args = build_parser().parse_args(_cli_argv(NON_DEFAULT))
    cfg = config_from_namespace(args)
    for name, v in NON_DEFAULT.items():
        assert getattr(cfg, name) == v, name


def test_recipe_arguments_carry_every_option_into_the_config():
    from trl import TrlParser

    argv = []
    for name, v in NON_DEFAULT.items():
        key = "--quant_method" if name == "method" else f"--{name}"
        if isinstance(v, tuple):
            argv += [key, *v]
        elif v is not None:
            argv += [key, str(v).lower() if isinstance(v, bool) else str(v)]
    (qargs,) = TrlParser((QuantArguments,)).parse_args_and_config(argv)
    cfg = qargs.quant_config()
    for name, v in NON_DEFAULT.items():
        assert getattr(cfg, name) == v, name


def test_saved_configs_of_earlier_versions_still_load():
    old = dict(method="gwq", wbits=3, blocksize=64, extra={"gwq_score": "fisher", "gwq_samples": 4})
    cfg = QuantConfig.from_dict(old)
    assert (cfg.lazy_batch, cfg.gwq_score, cfg.gwq_samples) == (64, "fisher", 4)
    with pytest.raises(ValueError, match="does not know"):
        QuantConfig.from_dict({"method": "gptq", "extra": {"mystery": 1}})
    with pytest.raises(ValueError, match="upgrade wct"):
        QuantConfig.from_dict({"method": "gptq", "new_option": 1})
