# teacal: `make demo` runs record -> fit -> sweep -> report on the tiny model; `make test` runs the tests.
# Both install into .venv first when needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TEACAL  := $(VENV)/bin/teacal
RUN     ?= results/demo
STAMP   := $(VENV)/.installed
# The tiny model's tensors are small: one thread per process is as fast on 2 cores, and several processes
# (sharded record, tests that spawn the CLI) no longer fight over them. Override with OMP_NUM_THREADS=N.
export OMP_NUM_THREADS ?= 1

DEMO_PROMPTS ?= prompts/demo.jsonl
THRESH  ?= 0.05:0.3:0.05

.PHONY: install test lint bench bench-real demo report train-tiny

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, as a matched pair from this machine's disk (REFERENCE §5); nothing later may replace them.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# [peers] brings cache-dit (DBCache), [real] transformers and accelerate for the stock Qwen pipelines (the tests
	# load a tiny local one); both accept the installed torch, so pip keeps it.
	$(PY) -m pip install -q -e '.[dev,peers,real]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check teacache calib tests

# Benchmarks (calib/bench.py): TeaCache's and recording's costs as ratios measured in one run, with a noise floor.
#   make bench       the tiny model: (a) overhead per call at threshold 0, (b) speedup as a fraction of ideal, (c) recording
#                    overhead, (d) peak memory
#   make bench-real  the same at Qwen-Image's real dimensions (60 layers x 3072, 4096 target + 4096 reference tokens of a
#                    1024² edit, random bf16 weights built on the GPU) when CUDA is present, sized for under 10 minutes on
#                    one GPU (--budget-s caps the timed repeats); without CUDA at reduced layers, width and tokens, a smoke
#                    test (about a minute on 2 busy CPU cores).
#                    Extra flags: make bench-real BENCH_ARGS="--steps 40" (see python -m calib.bench real --help).
BENCH_ARGS ?=

bench: install
	$(PY) -m calib.bench $(BENCH_ARGS)

bench-real: install
	$(PY) -m calib.bench real $(BENCH_ARGS)

# The main job on the embedded tiny model: record -> fit -> sweep -> report (a few minutes on 2 CPU cores).
demo: install
	$(TEACAL) record --model tiny-qwen-image-edit --prompts $(DEMO_PROMPTS) --out $(RUN)
	$(TEACAL) fit $(RUN) --out $(RUN)/preset.json
	$(TEACAL) sweep --preset $(RUN)/preset.json --run $(RUN) --thresh $(THRESH) --baseline identity --baseline flux --baseline mlx-qwen --target-psnr 30
	$(TEACAL) report $(RUN)
	@echo "report: $(RUN)/report/report.md"

report: install
	$(TEACAL) report $(RUN)

# LightX2V integration (issue 5): its own env (REFERENCE §3), LightX2V from a checkout, the CPU platform plugin.
#   make test-lightx2v LIGHTX2V_SRC=/path/to/LightX2V
LX_VENV      ?= .venv-lightx2v
LX_PY        := $(LX_VENV)/bin/python
LIGHTX2V_SRC ?=

$(LX_VENV)/.installed: integrations/lightx2v/cpu_platform/pyproject.toml Makefile
	test -x $(LX_PY) || python3 -m venv $(LX_VENV)
	$(LX_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LX_PY) -m pip install -q triton loguru einops omegaconf gguf imageio imageio-ffmpeg prometheus_client opencv-python-headless \
		safetensors pydantic 'diffusers>=0.42.1,<0.43' transformers accelerate av pyzmq decord ftfy numpy scipy pillow scikit-image pandas pytest \
		soundfile hypothesis pyarrow torchmetrics  # soundfile: lightx2v.infer (the launcher) imports it; the rest teacal's tests
	# LightX2V imports torchaudio; no release here matches torch 2.14.1, and --no-deps keeps pip from swapping torch.
	$(LX_PY) -m pip install -q --no-deps torchaudio
	$(LX_PY) -m pip install -q --no-deps -e integrations/lightx2v/cpu_platform
	touch $@

.PHONY: test-lightx2v
test-lightx2v: $(LX_VENV)/.installed
	@test -n "$(LIGHTX2V_SRC)" || { echo "make test-lightx2v: set LIGHTX2V_SRC=/path/to/a/LightX2V/checkout" >&2; exit 2; }
	LIGHTX2V_SRC=$(abspath $(LIGHTX2V_SRC)) PYTHONPATH=.:$(abspath $(LIGHTX2V_SRC)) $(LX_PY) -m pytest -q -m lightx2v tests/test_lightx2v.py

# Peers on the same chart (issue 7): calibrated TeaCache against diffusers' FirstBlockCache, MagCache, SeaCache and
# cache-dit's DBCache on the tiny model, measured in one sweep (same prompts, seeds, references, timing, metrics).
#   make compare [RUN=results/compare] [COMPARE_PROMPTS=prompts/shapes.jsonl]
.PHONY: compare
compare: RUN = results/compare
COMPARE_PROMPTS ?= prompts/shapes.jsonl
COMPARE_THRESH  ?= 0.05,0.1,0.2,0.3,0.5,0.8,1.2
COMPARE_METHODS ?= teacache,fbcache,magcache,seacache,dbcache

compare: install
	$(TEACAL) record --model tiny-qwen-image-edit --prompts $(COMPARE_PROMPTS) --out $(RUN)
	$(TEACAL) fit $(RUN) --out $(RUN)/preset.json
	$(TEACAL) sweep --preset $(RUN)/preset.json --run $(RUN) --method $(COMPARE_METHODS) --thresh $(COMPARE_THRESH)
	$(TEACAL) report $(RUN)
	@echo "report: $(RUN)/report/report.md"

# Retrain the embedded tiny model (about 20 min on one CPU thread): calib/weights/, docs/tiny/ (loss, edit success, samples).
train-tiny: install
	$(PY) -m calib.tiny.train train --out calib/tiny/weights/tiny-qwen-image-edit.safetensors --docs docs/tiny
	$(PY) -m calib.tiny.train evaluate --docs docs/tiny

# Regenerate integrations/lightx2v/qwen_image_tea.patch from a LightX2V tree where it is applied and edited:
#   make lightx2v-patch LIGHTX2V_TEA=/path/to/patched/LightX2V   (the patch is a plain `git diff` against f8aee98)
LIGHTX2V_TEA ?=
.PHONY: lightx2v-patch
lightx2v-patch:
	@test -n "$(LIGHTX2V_TEA)" || { echo "make lightx2v-patch: set LIGHTX2V_TEA=/path/to/a/LightX2V/tree/with/the/patch" >&2; exit 2; }
	cd $(LIGHTX2V_TEA) && git add -N lightx2v && git diff f8aee98 -- lightx2v > $(abspath integrations/lightx2v/qwen_image_tea.patch)
