import time

import numpy as np
import pyparallel as pp


def square(x):
    return x * x


def stuck_at_7(x):
    if x == 7:
        time.sleep(3600)  # a task that never ends
    return x


def fill(args):
    shared, i = args  # a pp.Array travels as a handle: the workers write the parent's memory
    np.asarray(shared)[i] = i * i
    return pp.current_worker().index  # which worker ran it: 0 or 1


if __name__ == "__main__":
    with pp.Pool(2) as pool:
        print(pool.map(square, range(10)))                    # multiprocessing.Pool's API
        print(pool.map(lambda x: x + 1, range(5)))            # lambdas work, any start method
        print(pool.map(pp.kernels.fib, range(25, 30)))        # a native kernel: C, no pickling
        shared = pp.Array("q", 8, lock=False)
        workers = pool.map(fill, [(shared, i) for i in range(8)])
        print(set(workers) <= {0, 1}, list(shared))
        try:
            pool.map(stuck_at_7, range(10), chunksize=1, task_timeout=1)
        except pp.TaskTimeoutError as e:                      # only that worker was replaced
            print("timed out:", e)
        pool.map(square, range(100_000),                      # progress=True: a tqdm bar
                 progress=lambda done, total: done == total and print(done, "of", total))
    hits = pp.Value("q", 0)
    hits.add(5)                                               # a lock-free atomic add
    print(hits.value)
    for r in pp.run_commands(["echo hello", "exit 3"], jobs=2):   # a shell command runner
        print(r.command, r.returncode, r.stdout.strip())
