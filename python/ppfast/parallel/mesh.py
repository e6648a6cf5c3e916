"""The 2-D rank layout of pipeline x data parallel: which pipeline and replica a rank is."""

from __future__ import annotations

import os

import torch


class PipelineMesh:
    """Which pipeline and which replica this rank is, and the process groups of both.

    ``pp_group`` joins the ranks of one pipeline (one replica): give it to every
    ``PipelineStage(..., group=mesh.pp_group)``; its ranks are the pipeline ranks
    ``0 .. pp-1``, and ``pp_rank`` is this rank's. ``dp_group`` joins the ranks that hold the
    same stages in every replica: give it to :class:`DataParallelGrads`; ``dp_rank`` says
    which replica this is, and so which share of the batch it trains on (:meth:`shard`).

    Built by :func:`pipeline_mesh`, or from any ``torch.distributed.device_mesh.DeviceMesh``
    with a pipeline dimension and a data-parallel dimension (it may have others, such as a
    tensor-parallel one): ``PipelineMesh(device_mesh, pp_dim="pp", dp_dim="dp")``.
    """

    def __init__(self, device_mesh, pp_dim: str = "pp", dp_dim: str = "dp"):
        names = tuple(device_mesh.mesh_dim_names or ())
        for what, dim in (("pp_dim", pp_dim), ("dp_dim", dp_dim)):
            if dim not in names:
                raise ValueError(
                    f"{what}={dim!r} is not a dimension of the mesh, whose dimensions are "
                    f"{names or 'unnamed'}; build it with mesh_dim_names naming both, e.g. "
                    "init_device_mesh(device_type, (pp, dp), mesh_dim_names=('pp', 'dp'))"
                )
        if pp_dim == dp_dim:
            raise ValueError(f"pp_dim and dp_dim must differ, both are {pp_dim!r}")
        self.device_mesh = device_mesh
        self.pp_group = device_mesh.get_group(pp_dim)
        self.dp_group = device_mesh.get_group(dp_dim)
        self.pp_rank = device_mesh.get_local_rank(pp_dim)
        self.dp_rank = device_mesh.get_local_rank(dp_dim)
        self.pp_size = device_mesh.size(names.index(pp_dim))
        self.dp_size = device_mesh.size(names.index(dp_dim))

    def shard(self, *tensors: torch.Tensor, dim: int = 0):
        """This replica's share of each global-batch tensor: the ``dp_rank``-th of ``dp_size``
        equal contiguous parts along ``dim``. One tensor in, one out; several give a tuple."""
        out = []
        for i, t in enumerate(tensors):
            if t.shape[dim] % self.dp_size:
                raise ValueError(
                    f"tensor {i}: a batch of {t.shape[dim]} along dim {dim} does not split into "
                    f"{self.dp_size} data-parallel replicas; use a global batch divisible by "
                    f"dp x n_microbatches"
                )
            out.append(t.chunk(self.dp_size, dim=dim)[self.dp_rank])
        return out[0] if len(out) == 1 else tuple(out)

    def __repr__(self) -> str:
        return (
            f"PipelineMesh(pp_rank={self.pp_rank}/{self.pp_size}, "
            f"dp_rank={self.dp_rank}/{self.dp_size})"
        )


def pipeline_mesh(pp: int, dp: int, device_type: str | None = None) -> PipelineMesh:
    """A ``pp x dp`` layout of this job's ranks; every rank calls it (it makes groups).

    Ranks are laid out pipeline-major: global rank ``r`` is pipeline rank ``r // dp`` of
    replica ``r % dp``. With pp=2, dp=2, replica 0's pipeline runs on ranks 0 and 2, and
    replica 1's on ranks 1 and 3; ranks 0 and 1 hold the same stages and average their
    gradients. So a data-parallel group is ``dp`` consecutive ranks, which torchrun puts on
    one host first: the all-reduce of every parameter stays on the fastest links, and only the
    pipeline's activations, one tensor per microbatch, cross hosts.

    ``device_type`` is "cuda" or "cpu" (default: "cuda" when CUDA is available). The mesh is
    torch's ``init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))``, kept as
    ``.device_mesh``; torch initializes the default group from torchrun's environment when
    nothing has yet.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    for name, value in (("pp", pp), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dist.is_initialized():
        world = dist.get_world_size()
    elif "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    else:
        raise RuntimeError(
            "torch.distributed is not initialized and WORLD_SIZE is not set: launch with "
            "torchrun, or call torch.distributed.init_process_group first"
        )
    if pp * dp != world:
        raise ValueError(
            f"pp={pp} x dp={dp} = {pp * dp} ranks, but the job has {world}; choose pp and dp "
            f"whose product is {world}, or launch {pp * dp} ranks"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))
    return PipelineMesh(mesh)
