"""The pool layer under :mod:`pyparallel.pool`, read top-down:

- :mod:`.errors`: the exceptions a pool raises;
- :mod:`.results`: ApplyResult, MapResult and the imap iterators (pyparallel's own, safe to
  complete from any thread);
- :mod:`.backend`: the protocol :class:`pyparallel.Pool` talks to, the job records it hands
  over, and the one life-cycle state machine;
- :mod:`.context`: the start-method rule and the worker Process class;
- :mod:`.local`: the shared-memory engine, the first backend.

Nothing here imports :mod:`pyparallel.pool`; the dependencies point down only.
"""
