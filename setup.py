"""Build for pyparallel._core.

Switches (environment variables, read at build time):
  PYPARALLEL_STRICT=1    -Wall -Wextra -Werror, and -Werror=deprecated-declarations named too:
                         no C API that the running Python (3.11 to 3.15) deprecates or removed
                         (the test build uses this, on every version CI tests)
  PYPARALLEL_SANITIZE=1  -fsanitize=address,undefined, -O1 -g (run with the ASan runtime preloaded)
  PYPARALLEL_DEBUG_BUILD=1  -O0 -g
  PYPARALLEL_NO_OPENMP=1 build the pthread fallback even when the compiler has OpenMP
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _version():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _compiler_accepts(compiler_cmd, flags):
    """True when the C compiler builds and links a small OpenMP program with ``flags``."""
    src = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        cmd = list(compiler_cmd) + flags + [path, "-o", os.path.join(tmp, "t")] + flags
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
        use_omp = not _flag("PYPARALLEL_NO_OPENMP") and _compiler_accepts(cc, ["-fopenmp"])
        for ext in self.extensions:
            ext.extra_compile_args = ["-std=c11", "-pthread", "-fvisibility=hidden"]
            ext.extra_link_args = ["-pthread"]
            ext.define_macros.append(("PP_VERSION", '"%s"' % _version()))
            if use_omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
                ext.define_macros.append(("PP_HAVE_OPENMP", "1"))
            if _flag("PYPARALLEL_STRICT"):
                ext.extra_compile_args += ["-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers",
                                           "-Werror=deprecated-declarations"]
            if _flag("PYPARALLEL_SANITIZE"):
                ext.extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
                ext.extra_link_args += ["-fsanitize=address,undefined"]
            elif _flag("PYPARALLEL_DEBUG_BUILD"):
                ext.extra_compile_args += ["-O0", "-g"]
            else:
                ext.extra_compile_args += ["-O2"]
        print("pyparallel: OpenMP %s" % ("enabled" if use_omp else "not available, using pthreads"), file=sys.stderr)
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "pyparallel._core",
            sources=sorted(glob.glob("src/*.c")),
            depends=sorted(glob.glob("src/*.h")),
            include_dirs=["src"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
