"""The local backend: worker processes on this machine, talking through shared memory.

- :mod:`.wire`: the message format on the rings (header, pickle, out-of-band buffers);
- :mod:`.spill`: shared segments for big buffers (the parent's pool, the worker's cache);
- :mod:`.fork`: workers forked directly under the fork start method;
- :mod:`.worker`: the worker's main loop;
- :mod:`.engine`: the parent side, the :class:`~pyparallel._pool.backend.Backend`.
"""
