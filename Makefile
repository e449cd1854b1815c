# pyparallel: the two set-up commands are `make demo` and `make test`; both build everything
# into a local virtual environment (.venv) from nothing but python3 and a C compiler.
# PYTHON selects the interpreter (make test PYTHON=python3.13); each gets its own venv.
PYTHON ?= python3
VENV   ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))
VPY    := $(VENV)/bin/python
EXTRAS ?= test,bench
# The extension is always compiled -Wall -Wextra -Werror here (PYPARALLEL_STRICT).
BUILD_ENV := PYPARALLEL_STRICT=1
PYTEST_ARGS ?=

.PHONY: all venv build demo test bench asan valgrind lint format clean

all: build

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BUILD_ENV) $(VPY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Rebuild the extension in place whenever a C source or header changed.
build: $(VENV)/.installed
	$(BUILD_ENV) $(VPY) setup.py -q build_ext --inplace

demo: build
	$(VPY) -m pyparallel demo

test: build
	PYTHONFAULTHANDLER=1 $(VPY) -m pytest -q $(PYTEST_ARGS)

# bench_pool's table also goes to benchmarks/results/bench_pool.json, drawn as benchmarks/results.png.
bench: build
	$(VPY) benchmarks/bench_kernels.py
	@mkdir -p benchmarks/results
	$(VPY) benchmarks/bench_pool.py --json benchmarks/results/bench_pool.json
	@for b in benchmarks/bench_*.py; do case $$b in */bench_kernels.py|*/bench_pool.py) ;; *) $(VPY) $$b || exit 1;; esac; done
	$(VPY) benchmarks/plot_results.py benchmarks/results/bench_pool.json -o benchmarks/results.png

# Memory checking: the test suite against an AddressSanitizer + UBSan build of _core
# (detect_leaks=0: CPython itself does not free everything at exit), then back to the
# normal build. Known artifact: gcc 12's ASan allocator has no fork handler, so a child forked
# while another thread of the parent is inside malloc can block for ever on the allocator's
# lock at its first allocation (seen with gdb in pyparallel's, multiprocessing's and mpire's
# workers alike); such a test fails by its timeout. glibc's own malloc takes its locks
# around fork, so normal builds are not affected.
ASAN_LIB = $(shell $(CC) -print-file-name=libasan.so)
asan: $(VENV)/.installed
	$(BUILD_ENV) PYPARALLEL_SANITIZE=1 $(VPY) setup.py -q build_ext --inplace --force
	LD_PRELOAD=$(ASAN_LIB) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONMALLOC=malloc \
	  $(VPY) -m pytest -q -p no:cacheprovider -m "not stress" $(PYTEST_ARGS); \
	  rc=$$?; $(BUILD_ENV) $(VPY) setup.py -q build_ext --inplace --force; exit $$rc

# The in-process tests of the C code (kernels, fork safety, codec, channel, shared memory,
# queues and pipes; forked children run under valgrind too, spawned ones and SIGKILL cases
# are left out) under valgrind memcheck (slow). The interpreter itself is not built for
# valgrind and reports noise of its own, so only errors with a frame in _core fail the run.
valgrind: $(VENV)/.installed
	mkdir -p build
	$(BUILD_ENV) PYPARALLEL_DEBUG_BUILD=1 $(VPY) setup.py -q build_ext --inplace --force
	PYTHONMALLOC=malloc valgrind -q --leak-check=no --log-file=build/valgrind.log \
	  $(VPY) -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_fork.py \
	  tests/test_codec.py tests/test_pool_channel.py tests/test_shared.py \
	  tests/test_queues.py tests/test_pipe.py \
	  -k "not gil and not large and not spawn and not forkserver and not sigkill" \
	  --hypothesis-seed=0 --timeout 900 $(PYTEST_ARGS); \
	  rc=$$?; $(BUILD_ENV) $(VPY) setup.py -q build_ext --inplace --force; \
	  if grep -q "_core\.cpython" build/valgrind.log; then echo "valgrind: errors in _core, see build/valgrind.log"; exit 1; fi; \
	  exit $$rc

# C formatting, checked with clang-format from PyPI (installed into the venv on first use).
lint: $(VENV)/.installed
	@$(VENV)/bin/clang-format --version >/dev/null 2>&1 || $(VPY) -m pip install -q clang-format
	$(VENV)/bin/clang-format --dry-run --Werror src/*.c src/*.h

format: $(VENV)/.installed
	@$(VENV)/bin/clang-format --version >/dev/null 2>&1 || $(VPY) -m pip install -q clang-format
	$(VENV)/bin/clang-format -i src/*.c src/*.h

clean:
	rm -rf build $(VENV) pyparallel/*.so *.egg-info .pytest_cache .hypothesis
