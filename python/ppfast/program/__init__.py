"""Schedules as data: the IR, the schedule generators, lowering, validation, simulation,
pictures and torch's formats.

Nothing here touches a device or torch.distributed: a program is made, checked and timed
before anything runs (the checks and the timing in the native engine, ``ppfast._C``).
"""
