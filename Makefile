# The two commands a new user needs: `make demo` and `make test`.
# Both install what is missing first (see scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sodp3d-installed
export MUJOCO_GL ?= egl

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/sodp3d demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/obs_pipeline.py

clean:
	rm -rf runs outputs .pytest_cache
