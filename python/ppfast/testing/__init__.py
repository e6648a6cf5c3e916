"""Backends for testing a pipeline on CPUs as it would run on GPUs.

``import ppfast.testing`` registers the c10d backend ``"nccl_emu"``: CPU tensors, moved by an
inner gloo group, with ProcessGroupNCCL's point-to-point semantics (tags ignored, a pair's
messages matched in issue order, per-operation calls inside a coalesced group returning no
Work, a group completing as one, groups running one after another as on one stream, sends
that complete only once their receive runs). A pipeline that NCCL's matching would break
breaks here, on a CPU, instead of on its first multi-GPU run::

    import ppfast.testing
    dist.init_process_group("nccl_emu")          # under torchrun, or with a store

See docs/nccl.md for what each of those points is in torch's ProcessGroupNCCL.
"""

from __future__ import annotations

import torch.distributed as dist

from .._native import C

BACKEND = "nccl_emu"


def _create(store, rank: int, size: int, timeout):
    inner = dist.ProcessGroupGloo(store, rank, size, timeout)
    return C.NcclEmuBackend(inner, rank, size, timeout)


# torch's registry is process-wide and refuses a second registration of one name
if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
