# Two commands for a newcomer on a fresh machine: `make demo` and `make test`. Both set everything up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static

.PHONY: setup arm-rpc demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "not root: install $(APT_PACKAGES) yourself for the data and ARM cross-compilation"; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,tvm,ray]'
	touch $(STAMP)

# The aarch64 RPC sysroot for the `arm` tests (tests/test_tvm_arm.py). Runs on every `make test`, not
# only when the stamp is rebuilt: after a reboot the sysroot is cached but binfmt_misc is empty, and `setup`
# re-registers it in milliseconds (every other step is skipped when its output exists). A failure here never
# fails the build: the arm tests then skip, and this says so loudly.
arm-rpc: $(STAMP)
	@if bash scripts/arm_rpc_sysroot.sh check; then echo "arm_rpc_sysroot: ready (the arm tests will run)"; \
	elif [ "$$(id -u)" != "0" ]; then \
	  echo "*** ARM TESTS WILL SKIP: the aarch64 RPC sysroot/binfmt_misc is not ready and this is not root;"; \
	  echo "*** run 'sudo scripts/arm_rpc_sysroot.sh setup' (Debian mirror + PyPI) to run them. ***"; \
	else start=$$(date +%s); \
	  if HWMPQ_ARM_PYTHON=$(PY) bash scripts/arm_rpc_sysroot.sh setup; then \
	    echo "arm_rpc_sysroot: setup took $$(( $$(date +%s) - start )) s (the arm tests will run)"; \
	  else echo "*** ARM TESTS WILL SKIP: scripts/arm_rpc_sysroot.sh setup failed (message above: no network,"; \
	    echo "*** no binfmt_misc permission in this container, ...). The rest of the suite still runs. ***"; fi; \
	fi

demo: setup
	$(VENV)/bin/hwmpq demo

test: setup arm-rpc
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/run_all.py --out runs/bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
