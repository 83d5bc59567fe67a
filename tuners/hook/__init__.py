"""The control hook, one concern per module:

- api.py       `Hook`, the user's API: watch, step, add_actuator, close; applies decisions
- meter.py     the training thread's counters and the watched iterator
- channel.py   the background thread and the socket to the daemon
- ranks.py     rank sync under torch.distributed
- embedded.py  the engine, process-tree and GPU figures in-process when no daemon answers
- runinfo.py   run name, config, socket paths, memory peaks
- actuators/   one module per kind of watched object and its knobs (loader, ddp)
"""
from looptune.tuners.hook.actuators import Actuator
from looptune.tuners.hook.api import Decision, Hook

__all__ = ["Actuator", "Decision", "Hook"]
