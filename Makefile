# Warren: two commands on a fresh Debian machine (as root).
#   make run   - three local RabbitMQ nodes, clustered, with Warren in front
#   make test  - installs what the tests need and runs the whole suite
# The interpreter Warren runs on: Debian's python3, as in the package
# (packaging/deb/build), so that tests and benchmarks measure what users run
# (a self-built CPython without PGO/LTO, such as pyenv's default, costs Warren
# ~10 % more CPU per connection: bench/OPTIMISATIONS.md).
PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEBS_RUN  := rabbitmq-server
DEBS_DEB  := python3 systemd
DEBS_TEST := rabbitmq-server iproute2 nftables haproxy keepalived iperf3 wrk chromium $(DEBS_DEB) util-linux
PYTEST_ARGS ?=
FUZZ_MINUTES ?= 20
FUZZ_EXAMPLES ?= 2000

.PHONY: run test fuzz check venv debs-run debs-test clean wheel deb

# The modules setup.py compiles with mypyc, whose extensions are built in place.
NATIVE_SRC := $(shell $(PYTHON) proxy/_native.py)
# Removes the extensions an earlier build left in place.
REMOVE_NATIVE := find proxy -name "*.so" -delete; rm -f ./*__mypyc.*.so

# Updated when pyproject.toml or a compiled module changes (pip builds the
# extensions anew); made anew when .venv was made by another interpreter.
ifneq ($(shell readlink -f $(VENV)/bin/python 2>/dev/null),$(shell readlink -f $(PYTHON) 2>/dev/null))
VENV_CLEAR := --clear
.PHONY: $(VENV)/.installed
endif
$(VENV)/.installed: pyproject.toml setup.py proxy/_native.py $(NATIVE_SRC)
	@./scripts/ensure-debs python3 python3-venv python3-dev gcc
	$(PYTHON) -m venv $(VENV_CLEAR) $(VENV)
	$(PIP) install -q --upgrade pip
	$(REMOVE_NATIVE)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

debs-run:
	@./scripts/ensure-debs $(DEBS_RUN)

debs-test:
	@./scripts/ensure-debs $(DEBS_TEST)

run: venv debs-run
	mkdir -p run
	$(PY) -m proxy.devcluster --config conf/warren.toml

test: venv debs-test
	$(PY) -m pytest $(PYTEST_ARGS)

# A long hypothesis campaign over every parser of outside input; writes bench/FUZZ.md.
fuzz: venv
	FUZZ_COMMAND="make fuzz FUZZ_MINUTES=$(FUZZ_MINUTES) FUZZ_EXAMPLES=$(FUZZ_EXAMPLES)" \
	  $(PY) -m tests.properties.campaign --minutes $(FUZZ_MINUTES) --examples $(FUZZ_EXAMPLES) --report bench/FUZZ.md

check: venv
	$(VENV)/bin/warren check conf/warren.toml

# dist/warren-<version>-cp311-cp311-linux_<arch>.whl (compiled: proxy/_native.py) and dist/warren-<version>.tar.gz
wheel: venv
	rm -f dist/warren-*.whl dist/warren-*.tar.gz
	$(PY) -m build --outdir dist .

# dist/warren_<version>-1_<arch>.deb (packaging/deb/build: a private virtualenv in /opt/warren)
deb: wheel
	@./scripts/ensure-debs $(DEBS_DEB)
	PIP=$(abspath $(PIP)) ./packaging/deb/build

clean:
	rm -rf $(VENV) run build dist *.egg-info .mypy_cache
	$(REMOVE_NATIVE)

include bench/Makefile.inc
