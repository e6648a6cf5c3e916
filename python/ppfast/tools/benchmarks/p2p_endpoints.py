"""The two ends of the P2P benchmark: ranks over c10d, over ppfast's shared memory, or as
threads of one process handing tensors over with streams and events."""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

WAIT_S = 300.0  # no hand-off between local ranks takes this long unless the other one died


class Work:
    def __init__(self, wait):
        self.wait = wait


class DistEndpoint:
    """One rank of a torch.distributed group of two (gloo or NCCL)."""

    def __init__(self, device: torch.device, post_thread: bool = False):
        self.rank, self.device, self.cuda = dist.get_rank(), device, device.type == "cuda"
        # A receive posted before a barrier would leave an NCCL kernel waiting beside the
        # barrier's; gloo's receives only announce a buffer, so they can be posted early.
        self.prepost = not self.cuda
        # gloo writes a send into the socket inside isend() when the receive is already
        # posted, so the poster, not gloo's thread, pays for the copy: optionally a thread
        self.poster = None
        if post_thread:  # on a GPU the thread must post for this rank's device
            init = (torch.cuda.set_device, (device,)) if self.cuda else (None, ())
            self.poster = ThreadPoolExecutor(1, initializer=init[0], initargs=init[1])

    def _post(self, op, t):
        if self.poster is None:
            return op(t, 1 - self.rank)
        posted = self.poster.submit(op, t, 1 - self.rank)
        return Work(lambda: posted.result().wait())

    def send(self, t):
        return self._post(dist.isend, t)

    def recv(self, t):
        return self._post(dist.irecv, t)

    def computing(self):
        return contextlib.nullcontext()  # NCCL has its own stream; compute on the current one

    def sync(self) -> None:
        # the current stream only: a wait() on NCCL work makes it wait for the transfer too
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.device.index]) if self.cuda else dist.barrier()

    def max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


class ShmEndpoint(DistEndpoint):
    """A gloo rank whose messages go through ppfast's shared-memory transport: a posted send
    copies into shared memory at once, a receive copies out when its rank next touches the
    transport (here: when it waits)."""

    def __init__(self, device: torch.device, post_thread: bool = False):
        super().__init__(device, post_thread)
        from ...runtime.transports import transport_for

        self.transport = transport_for(dist.group.WORLD, "cpu", "shm")

    def send(self, t):
        return self._post(lambda t, peer: self._work(self.transport.send(t, peer, 0)), t)

    def recv(self, t):
        return self._post(lambda t, peer: self._work(self.transport.recv(t, peer, 0)), t)

    @staticmethod
    def _work(handle) -> Work:
        return Work(lambda: handle.wait(WAIT_S))


class LocalHub:
    """Where the two thread ranks of the local mode meet: posted buffers, completions."""

    def __init__(self):
        self.posted = {p: queue.Queue() for p in ((0, 1), (1, 0))}  # (src, dst) -> buffers
        self.done = {p: queue.Queue() for p in ((0, 1), (1, 0))}  # (src, dst) -> events
        self.gate = threading.Barrier(2, timeout=WAIT_S)
        self.values: list[list[float]] = [[], []]


class LocalEndpoint:
    """One thread rank of the local mode (see the module docstring)."""

    prepost = True

    def __init__(self, hub: LocalHub, rank: int, device: torch.device):
        self.hub, self.rank, self.device, self.cuda = hub, rank, device, device.type == "cuda"
        self.compute = self.sender = None
        if self.cuda:
            self.compute = torch.cuda.Stream(device)
            # high priority, so a transfer that compute waits for is not queued behind compute
            self.sender = torch.cuda.Stream(device, priority=-1)

    def _event(self, stream):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _gpu_waits(self, event) -> None:
        # the GPU, not the host, waits: later compute reads (recv) or overwrites (send) it
        if event is not None:
            self.compute.wait_event(event)

    def send(self, t):
        dst, free = self.hub.posted[(self.rank, 1 - self.rank)].get(timeout=WAIT_S)
        if self.cuda:
            self.sender.wait_stream(self.compute)  # t was written on the compute stream
            self.sender.wait_event(free)  # and the receiver is done with its buffer
            with torch.cuda.stream(self.sender):
                dst.copy_(t, non_blocking=True)
            t.record_stream(self.sender)
            dst.record_stream(self.sender)
        else:
            dst.copy_(t)
        done = self._event(self.sender)
        self.hub.done[(self.rank, 1 - self.rank)].put(done)
        return Work(lambda: self._gpu_waits(done))

    def recv(self, t):
        self.hub.posted[(1 - self.rank, self.rank)].put((t, self._event(self.compute)))
        done = self.hub.done[(1 - self.rank, self.rank)]
        return Work(lambda: self._gpu_waits(done.get(timeout=WAIT_S)))

    def computing(self):
        return torch.cuda.stream(self.compute) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            self.compute.synchronize()
            self.sender.synchronize()

    def barrier(self) -> None:
        self.hub.gate.wait()

    def max(self, values: list[float]) -> list[float]:
        self.hub.values[self.rank] = values
        self.barrier()
        out = [max(pair) for pair in zip(*self.hub.values, strict=True)]
        self.barrier()  # nobody overwrites their values before both have read them
        return out


# ---------------------------------------------------------------- the measurements
