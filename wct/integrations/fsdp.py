"""Floor 5: FSDP2 (``torch.distributed.fsdp.fully_shard``) over packed models.

What FSDP2 does with a packed layer: :class:`~wct.nn.QuantLinear` stores its packed base, outlier values,
sparse column indices and bias as frozen ``nn.Parameter`` s, so ``fully_shard`` turns each into a DTensor holding
1/N of it on each rank, gathers it before the layer's forward (and backward, which needs ``W`` for the input's
gradient) and frees the gathered copy afterwards.  Two properties make that exact:

* **bytes, not values.**  A group whose tensors have different dtypes (int32 codes next to fp16 scales) is
  all-gathered as one ``uint8`` buffer of their bytes (``t.view(torch.uint8)``), and a single-dtype group by a
  plain copy: no float arithmetic touches a packed byte, so bit patterns that read as NaN in some float dtype come
  back unchanged (tests/test_fsdp.py checks it with such patterns).
* **no mixed-precision cast.**  FSDP2 never casts integer parameters, but ``MixedPrecisionPolicy(param_dtype=
  torch.bfloat16)`` casts every *floating* parameter of its group: fp16 scales, fp32 codebooks and absmax, 16-bit
  outliers and the bias would be rounded in every forward.  :func:`shard_packed_layers` therefore gives every
  packed layer its own FSDP group with a no-cast policy, *before* the blocks and the root are sharded with the
  user's policy (``fully_shard`` on a parent skips parameters a child group already owns, and accelerate's FSDP2
  preparation skips modules that are already sharded).  If a packed layer ends up in a casting group anyway,
  its forward refuses with a ``TypeError`` (``QuantLinear``'s storage dtype check) instead of computing with a
  rounded weight.

Where a tensor is split: along dim 0 (rows: output features for codes, scales and outlier values; entries for
flat tensors), or, when dim 0 has fewer entries than ranks (``qzeros`` of a per-channel integer format is
``[1, out·bits/32]``), along its longest dim that splits evenly (FSDP2 shards other dims only evenly; a tensor
with none stays on dim 0, held by the first rank).  The smallest unit ever split off is one stored element (an int32
word of packed codes, one fp16 scale); whether 3-bit codes straddle two words does not matter, because no rank
ever computes on its shard: FSDP gathers the whole tensor first.

The two structure indices (``col_idx``, ``sp_rowptr``) are buffers and stay whole on every rank (see
:mod:`wct.nn.quant_linear`); they are O(out) or O(n_weak) and read outside forward by the tuners.

Also here: :func:`packed_bytes_per_rank` (what a rank holds of the packed base), :func:`full_state_dict` (a
sharded model's full state on rank 0, for saving adapters and merged models) and :func:`fsdp2_enabled` (is the
current accelerate launch FSDP2?).  Commands and the memory formula: docs/distributed.md.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

from wct.nn import QuantLinear
from wct.nn.model_utils import find_blocks


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def packed_placement(world_size: int) -> Callable[[nn.Parameter], Any]:
    """``shard_placement_fn`` for packed tensors: dim 0, or the longest dim when dim 0 has fewer rows than ranks."""
    from torch.distributed.tensor import Shard

    def place(param: nn.Parameter):
        if param.dim() == 0:
            return None  # FSDP2's default (cannot happen for wct storage; kept for safety)
        if param.shape[0] >= world_size or param.dim() == 1:
            return Shard(0)
        # FSDP2 shards a dim other than 0 only evenly
        even = [d for d in range(1, param.dim()) if param.shape[d] % world_size == 0]
        return Shard(max(even, key=lambda d: param.shape[d])) if even else Shard(0)

    return place


def _world_size(mesh) -> int:
    if mesh is not None:
        return mesh.size()
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def shard_packed_layers(model: nn.Module, mesh=None, reshard_after_forward: bool = True,
                        offload_policy=None) -> int:
    """``fully_shard`` every :class:`~wct.nn.QuantLinear` of ``model`` in its own group, with no dtype cast.

    Call it first, then shard blocks / the root with any policy (or let ``accelerator.prepare`` do it).  Layers
    already sharded are left alone.  Returns how many layers were sharded.
    """
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
    place = packed_placement(_world_size(mesh))
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": MixedPrecisionPolicy(),
          "shard_placement_fn": place}
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    n = 0
    for module in list(model.modules()):
        if isinstance(module, QuantLinear) and not isinstance(module, FSDPModule):
            fully_shard(module, **kw)
            n += 1
    return n


def shard_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """FSDP2 without accelerate: packed layers (no cast), then each decoder block and the root with ``mp_policy``.

    ``blocks``: the modules to shard as units (default: the decoder blocks, :func:`wct.nn.model_utils.find_blocks`).
    """
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
    blocks = list(find_blocks(model)[1] if blocks is None else blocks)  # before sharding renames the layer classes
    shard_packed_layers(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in blocks:
        if not isinstance(block, FSDPModule):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    if not isinstance(model, FSDPModule):
        fully_shard(model, **kw)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def packed_bytes_per_rank(model: nn.Module) -> dict[str, int]:
    """What this rank holds of the packed layers: ``local`` (its shards and the whole index buffers) and ``full``
    (every packed tensor whole).  Unsharded, the two are equal; under FSDP2 ``local ≈ full / N``."""
    local = full = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for _, t in module.named_storage():
                lt = _local(t)
                local += lt.numel() * lt.element_size()
                full += t.numel() * t.element_size()
    return {"local": local, "full": full}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a (possibly FSDP2-sharded) model, on CPU, on rank 0; ``{}`` on the other ranks.

    A collective: every rank must call it.  Each shard is gathered as stored (``DTensor.full_tensor``), so packed
    bytes come back unchanged; the keys are the unsharded model's (FSDP2 adds no prefix).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsdp2_requested() -> bool:
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and str(os.environ.get("FSDP_VERSION", "1")) == "2")


def enable_fsdp2_on_cpu(trainer) -> bool:
    """Make a Trainer in an accelerate launch configured for FSDP2 really use FSDP2 on a machine without GPUs.

    accelerate switches its state to ``DistributedType.FSDP`` only for GPU-type states; on CPU the state stays
    ``MULTI_CPU`` and ``prepare`` wraps the model in DDP, silently ignoring the FSDP settings.  Called right after
    the Trainer is built (its ``Accelerator`` exists, nothing is prepared yet), this switches the shared accelerate
    state to FSDP with the plugin accelerate itself builds from the launcher's environment (``FSDP_*`` variables)
    and tells the Trainer (``is_fsdp_enabled``: optimizer created after the model is sharded, FSDP-aware saving).
    Returns whether FSDP2 is on.  A no-op on GPUs (accelerate does it there) and without an FSDP2 launch.
    """
    if not _fsdp2_requested():
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        return False
    if plugin.cpu_ram_efficient_loading:
        raise ValueError("fsdp_cpu_ram_efficient_loading moves the model to meta and back after the packed layers are "
                         "sharded; set it to false (recipes/configs/fsdp2_cpu2.yaml)")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def fsdp2_enabled() -> bool:
    """True inside an accelerate launch that runs FSDP2 (``distributed_type: FSDP``, ``fsdp_version: 2``)."""
    try:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    if not PartialState._shared_state:
        return False
    return PartialState().distributed_type == DistributedType.FSDP and _fsdp2_requested()
