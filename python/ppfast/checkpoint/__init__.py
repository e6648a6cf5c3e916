"""Stage checkpoints: each stage saves and loads its own shard, named as in the full model.

A checkpoint is a folder: a manifest and one shard per stage (see :mod:`.files`). Every name
in the shards is the parameter's or buffer's name in the unsplit model, so a checkpoint is
independent of how ranks held the stages, and :func:`gather` turns it into one state_dict for
the unsplit model, which :func:`load_full` splits again over any number of stages. Where a
stage's names sit in the full model comes from ``names=`` (see :func:`layouts`); stages cut
from one ``nn.Sequential`` (or ``ModuleList``) need none.

Usage, on every rank::

    import ppfast.checkpoint as ckpt

    ckpt.save("ckpt/step-100", sched, optimizer, step=100)  # sched: PipelineSchedule
    info = ckpt.load("ckpt/step-100", sched, optimizer)  # same stage count; info.step == 100

    # on 3 stages what was saved on 2: every rank reads the full state and keeps its share
    full = ckpt.gather("ckpt/step-100")
    ckpt.load_full(full, sched3, optimizer3, ckpt.gather_optimizer("ckpt/step-100"))

``save``, ``load_full``, ``shard`` and ``layouts`` are collective over the stages' process
group when the stages sit on several ranks (every rank calls them); ``load``, ``gather`` and
``gather_optimizer`` read files only. docs/checkpoints.md has the details.

Modules: :mod:`.held` (the stages a process holds), :mod:`.layout` (their full-model names),
:mod:`.optimizer` (optimizer state by those names), :mod:`.files` (the folder's files),
:mod:`.same_stages` (save, load) and :mod:`.full_model` (gather, shard, load_full).
"""

from .files import read_manifest
from .full_model import gather, gather_optimizer, load_full, shard
from .layout import StageLayout, layouts
from .same_stages import CheckpointInfo, load, save

__all__ = [
    "CheckpointInfo",
    "StageLayout",
    "gather",
    "gather_optimizer",
    "layouts",
    "load",
    "load_full",
    "read_manifest",
    "save",
    "shard",
]
