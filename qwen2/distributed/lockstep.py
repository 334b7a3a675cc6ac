"""Rank 0 leads, the other ranks follow: every call rank 0's engine makes on the sharded model
is broadcast to the other ranks, which make the same call on their shards.

The engine is not involved: `Leader` wraps the model it calls and sends whatever arguments a
call receives, pickled. What lets the KV cache work without knowing its type:
- An argument object of one of our classes (a cache) is a state object: each rank keeps its own
  copy, and the methods rank 0's engine calls on it between forwards (zeroing or copying
  blocks) are replayed on the others' copies.
- Its tensors: a small one (a block table) is sent whole whenever it changed since the ranks
  last agreed (torch's version counter); a large one (STATE_BYTES and up: a pool of keys and
  values) starts as zeros on the other ranks and is then written only by the calls and the
  replayed methods, each rank into its own heads. A large tensor changed any other way is an
  error, not a silent divergence.
- Every other tensor (the tokens, positions, slots of a call) is sent by value.
Contract for an engine: a cache keeps its tensors as attributes, and creates its large ones
outside `torch.inference_mode` (inference tensors have no version counter).

Messages go over a gloo group of their own with a long timeout, so the followers of an idle
server wait for rank 0 as long as it lives (a rank that dies closes its sockets, which the
others see at once); the model's collectives use the default group and its timeout
(QWEN2_TP_TIMEOUT), which ends a rank that waits on a hung peer.
"""

from __future__ import annotations

import atexit
import inspect
import io
import itertools
import logging
import pickle
import threading
import weakref
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qwen2.distributed.tensor_parallel import lost_contact

log = logging.getLogger(__name__)
IDLE_TIMEOUT = timedelta(days=365)  # followers wait this long between rank 0's calls
STATE_BYTES = 16 << 20  # a state tensor this large is a buffer the calls fill, never sent


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter
        return None


def _is_state(obj: Any) -> bool:
    return type(obj).__module__.startswith("qwen2.") and hasattr(obj, "__dict__") and not isinstance(
        obj, (type, nn.Module)) and not callable(obj)


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that cost memory only as they are written on the CPU (calloc'd pages)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _pack(t: torch.Tensor) -> tuple:
    """A tensor as plain data (a tensor inside a persistent id would be asked for its id again)."""
    return t.dtype, tuple(t.shape), t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()


def _unpack(dtype: torch.dtype, shape: tuple, data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(shape)


class _Held(tuple):
    """A state object's tensor as it travels: ("kept", n), ("value", n, data) or ("zeros", n, shape, dtype)."""

    __slots__ = ()


class _Sender(pickle.Pickler):
    def __init__(self, file: io.BytesIO, channel: Channel):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.channel = channel

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, torch.Tensor):
            return ("tensor", _pack(obj))
        return self.channel.object_id(obj) if _is_state(obj) else None


class _Receiver(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, channel: Channel):
        super().__init__(file)
        self.channel = channel

    def persistent_load(self, pid: tuple) -> Any:
        return self.channel.load(pid)


class Channel:
    """The broadcast of rank 0's calls; on rank 0 it remembers what the other ranks hold."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout: timedelta):
        self.group, self.device, self.timeout = group, device, timeout
        self.lock = threading.RLock()
        self.numbers = itertools.count()
        # rank 0: id(x) -> (weak ref to x, tensor version the others hold, x's number in messages)
        self.known: dict[int, tuple[weakref.ref, int | None, int]] = {}
        self.used: list[torch.Tensor] = []  # rank 0: state tensors of the current call
        self.inside = False  # rank 0: a call is running (state methods it calls are not replayed)
        self.fresh: list[int] = []  # rank 0: what the message being written introduces
        self.mirror: dict[int, Any] = {}  # the others: a number -> this rank's tensor or object
        self.closed = False

    # -- rank 0 --------------------------------------------------------------------------
    def _number(self, x: Any) -> tuple[int, bool]:
        """x's number, and whether the other ranks already hold it."""
        known = self.known.get(id(x))
        if known is not None and known[0]() is x:
            return known[2], True
        number = next(self.numbers)
        self.known[id(x)] = (weakref.ref(x), _version(x) if isinstance(x, torch.Tensor) else None, number)
        self.fresh.append(id(x))
        return number, False

    def state_tensor(self, t: torch.Tensor) -> _Held:
        """How a state object's tensor travels: kept, sent, or started as zeros (see the module doc)."""
        version, large = _version(t), t.numel() * t.element_size() >= STATE_BYTES
        if version is None:
            if large:
                raise RuntimeError(f"a {tuple(t.shape)} state tensor was made under torch.inference_mode, so it has "
                                   "no version counter; tensor parallelism needs it made outside")
            return _Held(("value", None, _pack(t)))
        held = self.known.get(id(t))
        number, seen = self._number(t)
        self.used.append(t)
        if seen and held[1] == version:
            return _Held(("kept", number))
        if large and seen:
            raise RuntimeError(f"a {tuple(t.shape)} state tensor changed outside the model's calls and its object's "
                               "methods; tensor parallelism cannot mirror that change to the other ranks")
        if large:
            return _Held(("zeros", number, tuple(t.shape), t.dtype))
        return _Held(("value", number, _pack(t)))

    def object_id(self, obj: Any) -> tuple:
        number, seen = self._number(obj)
        if not seen:
            self._replay_methods(obj)
        state = {k: self.state_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()
                 if not getattr(v, "_replays", False)}
        return ("object", number, type(obj), state)

    def _replay_methods(self, obj: Any) -> None:
        """Calls rank 0's engine makes on a state object between forwards also run on the others."""
        cls = type(obj)
        for name in dir(cls):
            if name.startswith("_") or not inspect.isfunction(inspect.getattr_static(cls, name)):
                continue
            method = getattr(obj, name)
            if getattr(method, "_replays", False):
                continue

            def replay(*args, _method=method, _name=name, **kwargs):
                if self.inside:  # the model's forward: every rank makes this call itself
                    return _method(*args, **kwargs)
                return self.call(_method, ("method", obj, _name, args, kwargs))

            replay._replays = True
            setattr(obj, name, replay)

    def call(self, run, message: tuple) -> Any:
        """Send the call to the other ranks, make it here, and note the state it wrote."""
        with self.lock:
            dead = [k for k, (ref, _, _) in self.known.items() if ref() is None]
            gone = [self.known.pop(k)[2] for k in dead]
            self._send(message + (gone,))
            inside, self.inside = self.inside, True
            try:
                return run(*message[-2], **message[-1])
            finally:
                self.inside = inside
                for t in self.used:  # what the call wrote, each rank wrote into its own copy
                    ref, _, number = self.known[id(t)]
                    self.known[id(t)] = (ref, _version(t), number)
                self.used.clear()

    def close(self) -> None:
        """Tell the other ranks to exit (rank 0, at exit)."""
        if self.closed or not self.lock.acquire(timeout=30):
            return
        try:
            self.closed = True
            self._send(("stop",))
            dist.destroy_process_group()  # gloo's threads left running at exit can abort the process
        except Exception as e:  # exiting anyway; the others see the closed sockets
            log.warning("could not stop the other ranks: %s", e)
        finally:
            self.lock.release()

    def _send(self, message: tuple) -> None:
        buf, self.fresh = io.BytesIO(), []
        try:
            _Sender(buf, self).dump(message)
        except BaseException:  # not sent: the others hold nothing of it
            for key in self.fresh:
                self.known.pop(key, None)
            self.used.clear()
            raise
        payload = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
        try:  # the group waits a year for a message, but a sender waits only as long as the model's collectives
            for t in (torch.tensor([payload.numel()], dtype=torch.int64), payload):
                dist.broadcast(t, 0, group=self.group, async_op=True).wait(timeout=self.timeout)
        except RuntimeError as e:
            lost_contact(e)

    # -- the other ranks -----------------------------------------------------------------
    def receive(self) -> tuple:
        size = torch.zeros(1, dtype=torch.int64)
        try:
            dist.broadcast(size, 0, group=self.group)
            payload = torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(payload, 0, group=self.group)
        except RuntimeError as e:
            lost_contact(e)
        return _Receiver(io.BytesIO(payload.numpy().tobytes()), self).load()

    def load(self, pid: tuple) -> Any:
        if pid[0] == "tensor":
            return _unpack(*pid[1]).to(self.device)
        _, number, cls, state = pid
        obj = self.mirror[number] if number in self.mirror else cls.__new__(cls)
        obj.__dict__.update({k: self._held(v) if isinstance(v, _Held) else v for k, v in state.items()})
        self.mirror[number] = obj
        return obj

    def _held(self, held: _Held) -> torch.Tensor:
        kind, number = held[0], held[1]
        if kind == "kept":
            return self.mirror[number]
        t = _zeros(*held[2:], self.device) if kind == "zeros" else _unpack(*held[2]).to(self.device)
        if number is not None:
            self.mirror[number] = t
        return t

    def ready(self) -> None:
        """Wait until every rank has built its shard (loading speeds differ; this wait has no short timeout)."""
        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            lost_contact(e)


def open_channel(device: torch.device, timeout: timedelta) -> Channel:
    """The message group (every rank calls this, in the same order); rank 0 stops the others at exit.
    `timeout`: how long rank 0 waits to hand a message over."""
    channel = Channel(dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT), device, timeout)
    if dist.get_rank() == 0:
        atexit.register(channel.close)
    return channel


class Leader(nn.Module):
    """Rank 0's model: forward and body run on every rank. Anything else reads rank 0's shard."""

    def __init__(self, net: nn.Module, channel: Channel):
        super().__init__()
        self.net = net
        self.channel = channel

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.channel.call(self.net, ("call", "forward", args, kwargs))  # called: its hooks run

    def body(self, *args, **kwargs) -> torch.Tensor:
        return self.channel.call(self.net.body, ("call", "body", args, kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


@torch.inference_mode()
def follow(net: nn.Module, channel: Channel) -> None:
    """Make rank 0's calls on this shard until it stops."""
    while True:
        message = channel.receive()
        if message[0] == "stop":
            return
        if message[0] == "method":
            _, target, name, args, kwargs, gone = message
        else:
            (_, name, args, kwargs, gone), target = message, net
        for number in gone:
            channel.mirror.pop(number, None)
        try:
            (target if name == "forward" else getattr(target, name))(*args, **kwargs)  # called: hooks run
        except Exception as e:  # rank 0 made the same call on the same inputs and saw the same error
            log.debug("a followed call failed: %s", e)
