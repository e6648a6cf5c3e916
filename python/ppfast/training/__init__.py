"""The training API: stages, the schedule classes, Pipe, microbatching, the traced frontend.

``PipelineStage`` computes one stage (F, I, B, W); ``PipelineSchedule`` and its subclasses run
a rank's stages under a schedule through the runtime; ``Pipe`` runs every rank as a thread of
this process. Model tools (split layers, DP wrappers, tied weights) plug in through
``extensions``, never by being imported here.
"""
