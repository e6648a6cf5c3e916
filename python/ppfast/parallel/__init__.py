"""Pipeline x data parallel: a 2-D rank layout, and gradients reduced over the replicas.

Every pipeline is replicated ``dp`` times; each replica trains on its own share of the batch,
and after the pipeline's step each parameter's gradient is averaged over the replicas that
hold the same stage. Usage, on ``pp * dp`` ranks (torchrun, or any initialized group)::

    mesh = ppfast.parallel.pipeline_mesh(pp=2, dp=2, device_type="cpu")
    stage = ppfast.PipelineStage(module, mesh.pp_rank, 2, "cpu", group=mesh.pp_group)
    schedule = ppfast.Schedule1F1B(stage, n_microbatches=4, loss_fn=loss_fn)
    reducer = ppfast.parallel.DataParallelGrads(schedule, mesh.dp_group)
    for ids, target in data:
        ids, target = mesh.shard(ids, target)  # this replica's share of the global batch
        optimizer.zero_grad()
        schedule.step(ids, target=target)      # gradients: mean over this replica's microbatches
        reducer.reduce()                       # ... and now over all replicas
        optimizer.step()

See docs/pp_dp.md for the layout, the overlap with the pipeline's tail, tied weights, and
using DDP or ZeroRedundancyOptimizer instead or beside.
"""

from . import dp_wrappers  # noqa: F401  (registers the DDP and FSDP drivers with the stage)
from .dp_grads import DataParallelGrads
from .mesh import PipelineMesh, pipeline_mesh

__all__ = ["DataParallelGrads", "PipelineMesh", "pipeline_mesh"]
