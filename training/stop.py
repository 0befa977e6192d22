"""Stopping on SIGTERM / SIGINT: save at the next step boundary that every rank reaches, or give up."""

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from utils.distributed import DistEnv

# Steps between two stop polls of a multi-process run: every rank takes part in each poll (a host
# barrier through gloo), so all stop at the same step, a multiple of this. 20 CIFAR-10 steps are
# a few seconds of training; a single process checks its flag every step, which costs nothing.
STOP_POLL_EVERY = 20
# Seconds a signalled process waits for its next poll before it exits on its own. A rank stuck in
# a collective because another one died would otherwise wait for torchrun's kill; the polls are a
# few seconds apart, and only compilation or an evaluation (whose checkpoint is already written)
# keeps the loop from them longer.
STOP_GRACE_S = 60.0


class StopRequest:
    """SIGTERM / SIGINT ask the loop to save and stop at the next poll (requested(step)).

    The handler only sets a flag and starts a timer: if no poll sees the request within
    ``grace_s`` seconds, the process prints an `error:` line and exits at once (os._exit). With
    several processes the flag is combined over ranks through a gloo group on CPU tensors every
    STOP_POLL_EVERY steps: no device sync, and every rank stops at the same step even if only some
    received the signal. A second Ctrl-C aborts at once.
    """

    def __init__(self, env: DistEnv, *, grace_s: float = STOP_GRACE_S):
        self.signum = None
        self.grace_s = grace_s
        self.timer = None
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self.timer = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self.timer.daemon = True
        self.timer.start()

    def _give_up(self, signum) -> None:
        print(f"error: no step boundary reached {self.grace_s:g} s after {signal.Signals(signum).name} (another "
              f"process may have failed, or compilation or an evaluation is running); exiting without saving, "
              f"the last checkpoint is kept", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def requested(self, step: int) -> bool:
        """Whether to stop before `step`: polled on all ranks when `step` is a multiple of STOP_POLL_EVERY."""
        if self.group is None:
            signum = self.signum or 0
        elif step % STOP_POLL_EVERY:
            return False
        else:
            flag = torch.tensor([self.signum or 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(flag.item())
            if signum and self.signum is None:  # asked on another rank
                self.signum = signum
        if signum:
            self._cancel_timer()  # this step boundary is reached: the loop saves and returns
        return signum != 0

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def restore(self) -> None:
        """Put back the previous handlers; a pending timer is cancelled, the loop being over."""
        self._cancel_timer()
        for s, handler in self.previous.items():
            signal.signal(s, handler)
