"""Benchmarks that ship with ppfast and run as ``ppfast bench NAME``."""

BENCHMARKS = {
    "p2p": "send/recv latency, bandwidth and compute overlap between two ranks",
    "schedules": "pipelined training speed, ppfast against torch.distributed.pipelining",
}
