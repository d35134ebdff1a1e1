# Two commands on a fresh machine with only Python 3.11+: `make demo` and `make test`.
# Each bootstraps its own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench bench-s3 bench-encryption bench-prune mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m benchmarks.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Sizes small and medium, seeds 1 and 2, against restic and borg (installed with apt when
# missing and run as root); rewrites docs/benchmarks.md and benchmarks/results/.
# Pass options with BENCH_ARGS, e.g. make bench BENCH_ARGS="--sizes small --seeds 1".
bench: $(VENV)/.installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# S3 request counts, faults and throughput against a local moto server (small data set,
# 500 snapshots); rewrites docs/benchmarks-s3.md and benchmarks/results/s3.json.
bench-s3: $(VENV)/.installed
	$(PY) -m benchmarks.s3 $(BENCH_ARGS)

# The same steps with encryption off and on (small data set); rewrites
# docs/benchmarks-encryption.md and benchmarks/results/encryption.json.
bench-encryption: $(VENV)/.installed
	$(PY) -m benchmarks.encryption $(BENCH_ARGS)

# 200 frequent snapshots (simulated time) thinned to a daily policy, then pruned: time
# and peak memory of forget and prune; rewrites docs/benchmarks-prune.md and
# benchmarks/results/prune.json.
bench-prune: $(VENV)/.installed
	$(PY) -m benchmarks.prune $(BENCH_ARGS)

# Mutation testing of restore, prune, retention and forget, the consistent cut, time
# parsing, check, the SQLite capture and the files cache (hours on two cores; results kept
# in mutants/ between runs); rewrites docs/mutation.md. Not part of CI.
# E.g. make mutation MUTATION_ARGS="--concept restore" or MUTATION_ARGS=--fresh.
$(VENV)/.mutation: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,mutation]'
	touch $@

mutation: $(VENV)/.mutation
	$(PY) -m benchmarks.mutation $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) demo-work bench-work mutants
