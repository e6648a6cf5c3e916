"""The runtime: one rank's lowered program run on the native executor over a transport.

``runner`` (RankRunner) drives ``ppfast._C.Executor``; ``transports`` chooses and builds the
transport (c10d, shared memory, in-process); ``metrics`` turns a step's timings into
StepMetrics and pictures; ``collectives`` and ``threads`` are the timed exchanges the layers
above use between steps; ``errors`` is what a failed or stuck peer raises. The runtime runs
any valid Program and knows no schedule by name.
"""
