"""Argument checks shared by the schedule generators, with messages that say what to change."""

from __future__ import annotations


def check_int(what: str, value: object, minimum: int, hint: str = "") -> int:
    # bool is an int subclass; True as a pipeline size is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{what} must be at least {minimum}, got {value}{extra}")
    return value


def check_p(name: str, p: object) -> int:
    return check_int(f"{name}: the number of pipeline ranks p", p, 1)


def check_m(name: str, m: object, minimum: int, why: str = "") -> int:
    return check_int(f"{name}: the number of microbatches m", m, minimum, why)


def check_v(name: str, v: object, minimum: int = 2) -> int:
    return check_int(
        f"{name}: the number of stages per rank v",
        v,
        minimum,
        "with one stage per rank use '1f1b' or 'zb-h1'" if minimum == 2 else "",
    )
