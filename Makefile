# radfm_jax: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Apache Beam (--runner=beam) in its own venv: it needs protobuf < 7, the tokenizer's sentencepiece protobuf 7
BEAM_VENV ?= .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip==25.3
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(BEAM_STAMP): requirements-beam.txt pyproject.toml
	test -x $(BEAM_VENV)/bin/python || $(PY) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install -q --upgrade pip==25.3
	$(BEAM_VENV)/bin/python -m pip install -q -r requirements-beam.txt
	$(BEAM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(BEAM_STAMP)

setup: $(STAMP) $(BEAM_STAMP)

# JAX_PLATFORMS=cpu: the demo runs on the CPU; without it JAX also probes libtpu (installed for the AOT tests),
# which fails on a machine without TPUs and contends for libtpu's lock file with other jobs.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VPY) -m radfm_jax.demo --workdir=runs/demo

test: $(STAMP) $(BEAM_STAMP)
	$(VPY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) $(BEAM_VENV) runs
