"""The typed public API (issue 12): the .pyi stubs next to the modules, checked three ways.

- ``mypy --strict tests/typed_example.py`` succeeds (the example uses the public API with
  annotated results, so a stub that returned the wrong type fails it), and a file of misuses
  gets an error on each marked line and nowhere else (so the stubs are not all ``Any``);
- ``mypy.stubtest`` compares every stub with the running modules' real signatures
  (``inspect.signature``) and attributes, with the exceptions in tests/stubtest_allowlist.txt;
- every name of ``pyparallel.__all__`` is declared by the package's stub, and has a
  docstring of its own; ``py.typed`` and the stubs are package data.
"""
import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest

import pyparallel

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pyparallel")


def _mypy(tmp_path, *args, cwd=ROOT):
    env = dict(os.environ, MYPY_FORCE_COLOR="0", NO_COLOR="1")
    env.pop("MYPYPATH", None)
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--cache-dir", str(tmp_path / "mypy-cache"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_typed_example_passes_mypy_strict(tmp_path):
    r = _mypy(tmp_path, "--warn-unreachable", os.path.join("tests", "typed_example.py"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "", r.stdout


def test_typed_example_runs(tmp_path):
    # what the example's annotations claim holds at run time too (it asserts the values)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "typed_example.py")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for part in ("pool ok", "kernels ok", "futures ok", "runner ok"):
        assert part in r.stdout, r.stdout


MISUSES = '''
    import pyparallel as pp
    from pyparallel import kernels

    def square(x: int) -> int:
        return x * x

    pool = pp.Pool(2)
    text: str = pool.map(square, [1])                           # E
    pool.map(square, ["a"])                                     # E
    pool.map(square, range(3), progress="yes")                  # E
    pool.imap(square, range(3), task_timeout="1")               # E
    pp.Pool(backend="spark")                                    # E
    pp.ThreadPool(2, task_timeout=1.0)                          # E
    n: str = kernels.fib(10)                                    # E
    pp.Value("i", 0).value = "x"                                # E
    f: float = pp.Array("d", 3)[0]
    s: str = pp.Array("d", 3)[0]                                # E
    pp.current_worker().pid                                     # E
    r = pp.run_commands(["true"], jobs=2)[0]
    r.returncode = 1                                            # E
    pp.run_commands(["true"], jobs="2")                         # E
    late: int = pool.apply_async(square, (2,)).get(timeout="soon")  # E
'''


def test_mypy_rejects_misuse(tmp_path):
    src = textwrap.dedent(MISUSES).lstrip("\n")
    path = tmp_path / "misuse.py"
    path.write_text(src)
    expected = {i for i, line in enumerate(src.splitlines(), 1) if line.rstrip().endswith("# E")}
    r = _mypy(tmp_path, str(path))
    got = {int(m.group(1)) for m in re.finditer(r"misuse\.py:(\d+): error", r.stdout)}
    assert got == expected, f"errors on lines {sorted(got)}, expected {sorted(expected)}:\n" \
                            f"{r.stdout}{r.stderr}"


def _stub_files():
    out = []
    for d, dirs, files in os.walk(PKG):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".pyi")]
    return sorted(out)


def test_stubs_match_the_runtime(tmp_path):
    """mypy's stubtest: each stub against the imported module (signatures, defaults, kinds of
    parameters, names missing on either side). The stubs alone are copied out, so that the
    modules without a stub are not analysed from their (untyped) sources."""
    stubs = tmp_path / "stubs"
    for rel in _stub_files():
        os.makedirs(stubs / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), stubs / rel)
    env = dict(os.environ, MYPYPATH=str(stubs))
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--concise",
                        "--ignore-unused-allowlist",
                        "--mypy-config-file", os.devnull,
                        "--allowlist", os.path.join(ROOT, "tests", "stubtest_allowlist.txt"),
                        "pyparallel"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr


def _declared(path):
    """Names a stub file declares: definitions, annotated names, assignments, re-exports
    (``import X as X``; ``from m import X as X``), with where each re-export comes from."""
    tree = ast.parse(open(path).read(), path)
    names, reexports, exported = set(), {}, None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                    if t.id == "__all__":
                        exported = ast.literal_eval(node.value)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.asname == a.name:
                    names.add(a.name)
                    reexports[a.name] = ("." * node.level + (node.module or ""), a.name)
    return names, reexports, exported


def _stub_of(module):
    """The stub file of a module of the package (pyparallel.x.y or .x relative to the root)."""
    parts = module.lstrip(".").split(".") if module.startswith(".") else module.split(".")[1:]
    base = os.path.join(PKG, *parts) if parts and parts != [""] else PKG
    for cand in (base + ".pyi", os.path.join(base, "__init__.pyi")):
        if os.path.exists(cand):
            return cand
    return None


def test_every_public_name_has_a_stub():
    init = os.path.join(PKG, "__init__.pyi")
    names, reexports, exported = _declared(init)
    assert exported is not None and sorted(exported) == sorted(pyparallel.__all__)
    for name in pyparallel.__all__:
        assert name in names, f"pyparallel.{name} is not in __init__.pyi"
        if name in reexports:
            module, orig = reexports[name]
            stub = _stub_of(module)
            assert stub is not None, f"pyparallel.{name} comes from {module}, which has no stub"
            if os.path.basename(stub) == "__init__.pyi" and module.lstrip(".") == name:
                continue  # a subpackage re-exported by name
            if module.lstrip(".") == orig:  # "from . import kernels as kernels": a module
                assert _stub_of("." + orig) is not None
                continue
            assert orig in _declared(stub)[0], f"{orig} is not declared in {stub}"


def _public_objects():
    for name in pyparallel.__all__:
        obj = getattr(pyparallel, name)
        if not isinstance(obj, str):  # __version__
            yield name, obj


@pytest.mark.parametrize("name,obj", list(_public_objects()),
                         ids=[n for n, _ in _public_objects()])
def test_every_public_name_has_a_docstring_and_signature(name, obj):
    own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert isinstance(own, str) and own.strip(), f"pyparallel.{name} has no docstring"
    if inspect.ismodule(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
        return  # a module; an exception, built like any exception: (*args)
    try:
        inspect.signature(obj)
    except (TypeError, ValueError):  # a C callable: its docstring must start with one
        assert re.match(rf"{name}\(.*\)", own), f"pyparallel.{name}: no signature known"


def test_py_typed_and_stubs_are_package_data():
    assert os.path.exists(os.path.join(PKG, "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        conf = tomllib.load(f)["tool"]["setuptools"]
    data = conf["package-data"]
    for rel in _stub_files():
        package = os.path.dirname(rel).replace(os.sep, ".")
        assert package in conf["packages"], rel
        assert "*.pyi" in data.get(package, []), f"{rel} is not package data of {package}"
