"""Every tunable number of the Python layer, in one table (the C side's are in src/pp.h).

Each was chosen by measurement on a 2-CPU virtual machine (see benchmarks/); change one only
with a benchmark run beside it.
"""
from __future__ import annotations

# ---- the local engine's scheduling ----
#: chunks sent ahead to each worker (one running, the rest queued in its ring) ...
WINDOW = 2
#: ... unless tasks take longer than this on average (seconds): then one each, for balance
LONG_TASK = 0.010
#: the rings of one worker slot (bytes): tasks parent -> worker, results worker -> parent
TASK_RING_BYTES = 8 << 20
RESULT_RING_BYTES = 2 << 20
#: the collector looks at everything at least this often (seconds), whatever wakeups say
SAFETY_WAIT = 1.0
#: imap: results allowed to wait unread, per worker (times WINDOW), at least IMAP_AHEAD_MIN
IMAP_AHEAD_PER_WORKER = 4
IMAP_AHEAD_MIN = 16

# ---- waiting ----
#: a caller about to block on a result first polls the rings itself this long (microseconds)
SPIN_US = 150.0
#: ... unless tasks take longer than this on average (seconds)
NO_SPIN_TASK = 0.001
#: a caller that collected its own result holds a lease this long (microseconds), during
#: which workers do not wake the collector (it looks by itself when the lease ends)
LEASE_US = 1000.0
#: a worker polls its ring this long after a task before it sleeps on a futex (microseconds)
WORKER_SPIN_US = 50.0

# ---- messages ----
#: buffers at least this big travel out of band (straight from their memory into the ring)
OOB_MIN = 32 * 1024
#: a task whose out-of-band buffers add up to this much has them copied into a shared segment
#: the worker maps and unpickles from: one copy in all, not one into the ring and one out
SPILL_MIN = 1 << 20
#: spill segments are sized in multiples of this
SPILL_ROUND = 1 << 20
#: free spill segments kept for reuse, at most (bytes)
SPILL_KEEP_BYTES = 256 << 20
#: a worker keeps this many spill segments mapped, at most
SPILL_CACHE_MAX = 16
#: a result whose out-of-band buffers (numpy arrays, ...) add up to this much goes through a
#: shared segment of the worker's that the parent maps and keeps: the parent's arrays are
#: views of it (one copy in all, instead of one into the ring and one out of it)
RESULT_SPILL_MIN = 1 << 20
#: the parent keeps at most this many such segments alive (each holds a file descriptor);
#: beyond that, results come through the ring again until some are freed
RESULT_SEGMENTS_MAX = 512
#: a worker holds at most this many result segments the parent has not mapped yet
RESULT_SEGMENTS_HELD = 64
#: lists of plain numbers at least this long travel packed (codec.c)
PACK_MIN = 64
#: a worker unpacks a chunk of packed records this many at a time as its function takes them
#: (the argument tuples are freed as it goes: their memory is reused, not faulted in anew)
RECORDS_PART = 512

# ---- functions ----
#: a function whose by-value pickle (with the globals it must carry) is bigger than this
#: warns once: the globals would be better passed as an argument or kept in pp.Array
BIG_FUNCTION_BYTES = 10 << 20

# ---- faults ----
#: workers that die before running any task, one after another, before the pool gives up
#: with InitializerError instead of starting more
MAX_EARLY_DEATHS = 3
#: seconds to wait for a killed worker to be reaped
KILL_JOIN = 5.0
