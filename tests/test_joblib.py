"""The joblib backend "pyparallel" (pyparallel.joblib)."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

joblib = pytest.importorskip("joblib")

from concurrent.futures.process import BrokenProcessPool  # noqa: E402

from joblib import Parallel, delayed, parallel_config  # noqa: E402

import pyparallel as pp  # noqa: E402
import pyparallel.joblib as ppj  # noqa: E402


def square(x):
    return x * x


def pid_after(t):
    time.sleep(t)
    return os.getpid()


def fail_on(x, bad=7):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def nested(n):
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def thread_env(_):
    return tuple(os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                             "MKL_NUM_THREADS"))


def die(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_registered_on_import():
    assert joblib.parallel.BACKENDS["pyparallel"] is ppj.PyParallelBackend
    ppj.register("pyparallel-again")
    assert joblib.parallel.BACKENDS["pyparallel-again"] is ppj.PyParallelBackend


@pytest.mark.parametrize("n_jobs", [2, -1, -2])
def test_parallel_results(n_jobs):
    with parallel_config(backend="pyparallel"):
        out = Parallel(n_jobs=n_jobs)(delayed(square)(i) for i in range(300))
    assert out == [i * i for i in range(300)]


def test_runs_in_the_pool_workers():
    pids = set(Parallel(n_jobs=2, backend="pyparallel")(
        delayed(pid_after)(0.02) for _ in range(20)))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_n_jobs_minus_one_uses_every_cpu():
    assert ppj.PyParallelBackend().effective_n_jobs(-1) == pp.cpu_count()
    with pytest.raises(ValueError):
        ppj.PyParallelBackend().effective_n_jobs(0)


def test_workers_are_reused_between_calls():
    first = set(Parallel(n_jobs=2, backend="pyparallel")(
        delayed(pid_after)(0.05) for _ in range(8)))
    second = set(Parallel(n_jobs=2, backend="pyparallel")(
        delayed(pid_after)(0.05) for _ in range(8)))
    assert second <= first


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generators(return_as):
    gen = Parallel(n_jobs=2, backend="pyparallel", return_as=return_as)(
        delayed(square)(i) for i in range(50))
    assert not isinstance(gen, list)
    out = list(gen)
    if return_as == "generator":
        assert out == [i * i for i in range(50)]
    else:
        assert sorted(out) == [i * i for i in range(50)]


def test_errors_carry_the_remote_traceback():
    with pytest.raises(ValueError, match="bad item 7") as info:
        Parallel(n_jobs=2, backend="pyparallel")(delayed(fail_on)(i) for i in range(30))
    assert "fail_on" in str(info.value.__cause__)
    # the backend is usable after the abort
    assert Parallel(n_jobs=2, backend="pyparallel")(delayed(square)(i) for i in range(5)) \
        == [0, 1, 4, 9, 16]


def test_timeout_aborts_the_call():
    import multiprocessing

    with pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=2, backend="pyparallel", timeout=0.3)(
            delayed(time.sleep)(t) for t in [0.01, 5, 5])
    assert Parallel(n_jobs=2, backend="pyparallel")(delayed(square)(i) for i in range(3)) \
        == [0, 1, 4]


def test_nested_parallel_inside_a_task():
    out = Parallel(n_jobs=2, backend="pyparallel")(delayed(nested)(n) for n in range(6))
    assert out == [sum(i * i for i in range(n)) for n in range(6)]


def test_oversubscription_guard(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    want = str(max(pp.cpu_count() // 2, 1))
    out = set(Parallel(n_jobs=2, backend="pyparallel")(delayed(thread_env)(i)
                                                      for i in range(10)))
    assert out == {(want, want, want)}
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")  # the parent's setting wins, as in joblib
    out = set(Parallel(n_jobs=2, backend="pyparallel")(delayed(thread_env)(i)
                                                      for i in range(10)))
    assert out == {(want, "7", want)}


def test_worker_death_fails_the_call_with_a_broken_pool_error():
    with pytest.raises(BrokenProcessPool, match="SIGKILL"):
        Parallel(n_jobs=2, backend="pyparallel", batch_size=1)(
            delayed(die)(i) for i in range(10))
    assert Parallel(n_jobs=2, backend="pyparallel")(delayed(square)(i) for i in range(4)) \
        == [0, 1, 4, 9]


def test_unpicklable_argument_raises():
    import threading

    with pytest.raises(Exception, match="pickle"):
        Parallel(n_jobs=2, backend="pyparallel")(delayed(square)(threading.Lock())
                                                 for _ in range(3))


def test_unknown_backend_argument_raises():
    with pytest.raises(TypeError, match="unexpected"):
        with parallel_config(backend="pyparallel", no_such_option=1):
            Parallel(n_jobs=2)(delayed(square)(i) for i in range(3))


_NOTEBOOK = """
import pyparallel.joblib
from joblib import Parallel, delayed, parallel_config
if __name__ == "__main__":
    with parallel_config(backend="pyparallel"):
        print(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(3)))   # workers start here
        def cell_function(x):    # defined after the workers started, as in a notebook cell
            return x * OFFSET
        OFFSET = 10
        print(Parallel(n_jobs=2)(delayed(cell_function)(i) for i in range(5)))
        print(Parallel(n_jobs=2)(delayed(lambda x: x + 1)(i) for i in range(3)))
"""


def test_notebook_style_functions(tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(_NOTEBOOK)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["[0, 1, 2]", "[0, 10, 20, 30, 40]", "[1, 2, 3]"]


def test_missing_joblib_names_the_extra():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "joblib" or name.startswith("joblib."):
                    raise ImportError("no joblib here")
        sys.meta_path.insert(0, Block())
        try:
            import pyparallel.joblib
        except ImportError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "pip install pyparallel[joblib]" in out.stdout, out.stderr


def test_scikit_learn_estimator_with_n_jobs():
    # in the test extra where it has wheels (not on 3.15 yet); looked up, not imported: it
    # loads its own OpenMP runtime, whose threads would stay in this process and make later
    # fork-hazard checks see them, so the estimator runs in a fresh interpreter
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (the test extra has it where it has wheels)")
    code = textwrap.dedent("""
        from joblib import parallel_config
        from sklearn.datasets import make_classification
        from sklearn.ensemble import RandomForestClassifier
        import pyparallel.joblib  # noqa: F401  (registers the backend)

        X, y = make_classification(n_samples=200, n_features=8, random_state=0)
        ref = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
        with parallel_config(backend="pyparallel"):
            clf = RandomForestClassifier(n_estimators=20, random_state=0, n_jobs=2).fit(X, y)
        print(bool((clf.predict(X) == ref.predict(X)).all()))
    """)
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


# ---- joblib's own test_parallel.py and test_config.py, on the pyparallel backend ----------

# Cases of joblib's suite tied to loky or to joblib's memory-mapping by design (the README's
# joblib section says why): a worker gets an np.memmap of a big argument (here: an ndarray
# view of a shared segment), Parallel(prefer="processes") with no backend chosen is a
# LokyBackend (here: pyparallel's, made joblib's default), loky's memmap files in temp_folder.
_NOT_APPLICABLE = ["test_auto_memmap_on_arrays_from_generator", "test_memmapping_leaks",
                   "test_parallel_config_no_backend", "test_parallel_config_params_explicit_set"]


@pytest.mark.timeout(900)
def test_joblib_own_parallel_suite(tmp_path):
    """Runs the installed joblib's test_parallel.py the way its suite treats a process
    backend: "pyparallel" in place of its PROCESS_BACKENDS, registered in every interpreter
    (sitecustomize) as joblib's default backend, the cases that name it selected; and its
    test_config.py whole."""
    tests = os.path.join(os.path.dirname(joblib.__file__), "test")
    source = os.path.join(tests, "test_parallel.py")
    if not os.path.exists(source):
        pytest.skip("this joblib was installed without its tests")
    text = open(source).read()
    text, n = re.subn(r'PROCESS_BACKENDS = \["multiprocessing", "loky"\]',
                      'PROCESS_BACKENDS = ["pyparallel"]', text)
    assert n == 1, "joblib's test_parallel.py changed: update this harness"
    (tmp_path / "test_joblib_parallel.py").write_text(text)
    (tmp_path / "test_joblib_config.py").write_text(open(os.path.join(tests, "test_config.py")).read())
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import pyparallel.joblib\npyparallel.joblib.register(make_default=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), os.environ.get("PYTHONPATH", "")]))
    deselect = " and ".join(f"not {name}" for name in _NOT_APPLICABLE)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=120",
         "-W", "ignore::pytest.PytestUnknownMarkWarning",
         "-k", f"(pyparallel or test_joblib_config) and {deselect}",
         "--rootdir", str(tmp_path), str(tmp_path / "test_joblib_parallel.py"),
         str(tmp_path / "test_joblib_config.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880)
    tail = out.stdout[-4000:]
    assert out.returncode == 0, tail + out.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", tail).group(1))
    assert passed >= 100, tail
