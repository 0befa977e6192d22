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

    A signal sets a flag and starts a timer: if no poll sees the request within ``grace_s`` seconds,
    the process prints an `error:` line and exits at once (os._exit). The timer is started by a
    watcher thread woken through ``signal.set_wakeup_fd``, not by the Python handler: the handler
    runs only when the main thread returns from C code, which a rank blocked in a collective (its
    peer died) does only when the collective times out, 30 minutes later. With several processes the
    flag is combined over ranks through a gloo group on CPU tensors every STOP_POLL_EVERY steps: no
    device sync, and every rank stops at the same step even if only some received the signal. A
    second Ctrl-C aborts at once (once the main thread runs Python again).
    """

    def __init__(self, env: DistEnv, *, grace_s: float = STOP_GRACE_S):
        self.signum = None
        self.grace_s = grace_s
        self.timer = None
        self.settled = False  # a step boundary was reached, or the loop is over: no timer any more
        self.lock = threading.Lock()
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        # The C-level handler writes each signal's number to this pipe at once, whatever the main thread does.
        read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-watcher", daemon=True)
        self.watcher.start()

    def _watch(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while byte := pipe.read(1):  # empty once restore() closes the write end
                if byte[0] in (signal.SIGTERM, signal.SIGINT):
                    self._start_timer(byte[0])

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self._start_timer(signum)

    def _start_timer(self, signum: int) -> None:
        with self.lock:
            if self.timer is None and not self.settled:
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
            self._settle()  # this step boundary is reached: the loop saves and returns
        return signum != 0

    def _settle(self) -> None:
        with self.lock:
            self.settled = True
            if self.timer is not None:
                self.timer.cancel()

    def restore(self) -> None:
        """Put back the previous handlers and wakeup fd; a pending timer is cancelled, the loop being over."""
        self._settle()
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        os.close(self.write_fd)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
