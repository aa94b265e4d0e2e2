# The two commands of the README:
#   make demo   install, then train the demo embedding on the built-in model (CPU, about a minute)
#   make test   install, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test quicktest lint browser

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train_textual_inversion.py --config presets/demo.toml save.output_dir=output/demo-$$(date +%Y%m%d-%H%M%S)

# The review page and the sweep report are tested in headless Chromium (Debian's package). As root it is
# installed here; otherwise install it yourself (apt-get install chromium) or those tests skip, saying why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; fi

test: $(STAMP) browser
	$(PY) -m pytest

# The inner loop: everything but the tests marked slow (make test and CI run them all).
quicktest: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
