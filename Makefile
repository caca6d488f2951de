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

.PHONY: install test lint bench bench-real demo report train-tiny

install: $(STAMP)

# torch and torchvision first, as a matched pair from this machine's disk; nothing later may replace them. Then the
# project with [toolkit] (the `teacal` command's stack; the runtime alone needs only torch and numpy), [dev] (pytest,
# ruff), [peers] (cache-dit, DBCache) and [real] (transformers and accelerate for the stock Qwen pipelines; the tests
# load a tiny local one); all accept the installed torch, so pip keeps it. About 3 minutes the first time.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[toolkit,dev,peers,real]'
	touch $(STAMP)
	@echo "installed: run teacal as $(TEACAL), or after 'source $(VENV)/bin/activate' as teacal"

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

# The main job on the embedded tiny model (about 18 minutes on 2 idle CPU cores, 17.8 measured with the install): record the calibration prompts, probe what
# skips cost the final image, fit a preset, tune it by generating on the calibration prompts, then measure it on
# held-out prompts it never saw and write the report.
CALIB_PROMPTS   ?= prompts/calib.jsonl
HELDOUT_PROMPTS ?= prompts/heldout.jsonl

# The oracle is verified by generating: a sweep of the calibration run measures every static schedule (the cost
# model's among them), and the second fit keeps the best per budget, and the next two as runners-up that the held-out
# sweep generates too (its report's oracle is the best static schedule measured there).
STATIC_BASELINES = --baseline constant --baseline identity --baseline wan21 --baseline uniform
MODIN_BASELINES = --baseline flux --baseline mlx-qwen  # the borrowed sets on modin: what tune must also match
# tune then refines the fitted polynomial by generating its schedules on the calibration prompts (calib/tune.py).
DEMO_TUNE_ROUNDS ?= 60

demo: install
	$(TEACAL) record $(RUN)/calib --prompts $(CALIB_PROMPTS)
	$(TEACAL) probe $(RUN)/calib --forecast
	$(TEACAL) fit $(RUN)/calib --out $(RUN)/calib-preset.json
	$(TEACAL) sweep $(RUN)/calib --out $(RUN)/calib-sweep --preset $(RUN)/calib-preset.json $(STATIC_BASELINES) $(MODIN_BASELINES) --forecast none
	$(TEACAL) fit $(RUN)/calib --out $(RUN)/fitted-preset.json --oracle-from $(RUN)/calib-sweep
	$(TEACAL) tune $(RUN)/calib --preset $(RUN)/fitted-preset.json --against $(RUN)/calib-sweep --out $(RUN)/preset.json --rounds $(DEMO_TUNE_ROUNDS)
	$(TEACAL) record $(RUN)/heldout --prompts $(HELDOUT_PROMPTS)
	$(TEACAL) sweep $(RUN)/heldout --preset $(RUN)/preset.json --baseline identity --baseline flux --baseline mlx-qwen
	$(TEACAL) report $(RUN)/heldout
	@echo "report: $(RUN)/heldout/report/report.md"

# The evidence behind the README's tables: one preset calibrated on prompts/calib.jsonl at 20 and 40 steps, measured on
# the held-out prompts (never used to calibrate or tune) against every borrowed coefficient set, uniform spacing, the
# oracle, FirstBlockCache and MagCache, with and without the calibrated forecast. About two hours on 2 CPU cores.
EVAL ?= results/eval
EVAL_STEPS ?= 20 40
EVAL_BASELINES = --baseline constant --baseline identity --baseline flux --baseline wan21 --baseline mlx-qwen --baseline uniform

.PHONY: eval
eval: install
	$(TEACAL) record $(EVAL)/calib --prompts $(CALIB_PROMPTS) $(EVAL_STEPS:%=--steps %)
	$(TEACAL) probe $(EVAL)/calib --forecast
	$(TEACAL) fit $(EVAL)/calib --out $(EVAL)/calib-preset.json
	for n in $(EVAL_STEPS); do \
		$(TEACAL) sweep $(EVAL)/calib --steps $$n --out $(EVAL)/calib-sweep-$$n --preset $(EVAL)/calib-preset.json $(STATIC_BASELINES) \
			--forecast none || exit 1; \
	done
	for n in $(EVAL_STEPS); do \
		$(TEACAL) sweep $(EVAL)/calib --steps $$n --out $(EVAL)/calib-borrowed-$$n --preset $(EVAL)/calib-preset.json $(MODIN_BASELINES) \
			--oracle none --forecast none || exit 1; \
	done
	$(TEACAL) fit $(EVAL)/calib --out $(EVAL)/fitted-preset.json $(EVAL_STEPS:%=--oracle-from $(EVAL)/calib-sweep-%)
	$(TEACAL) tune $(EVAL)/calib --preset $(EVAL)/fitted-preset.json --out $(EVAL)/preset.json \
		$(EVAL_STEPS:%=--against $(EVAL)/calib-sweep-%) $(EVAL_STEPS:%=--against $(EVAL)/calib-borrowed-%)
	$(TEACAL) record $(EVAL)/heldout --prompts $(HELDOUT_PROMPTS) $(EVAL_STEPS:%=--steps %)
	for n in $(EVAL_STEPS); do \
		$(TEACAL) sweep $(EVAL)/heldout --steps $$n --out $(EVAL)/sweep-$$n --preset $(EVAL)/preset.json $(EVAL_BASELINES) \
			--method teacache --method fbcache --method magcache --forecast none --forecast calibrated && \
		$(TEACAL) report $(EVAL)/sweep-$$n || exit 1; \
	done
	@echo "reports: $(EVAL)/sweep-*/report/report.md"

report: install
	$(TEACAL) report $(RUN)

# LightX2V integration (issue 5): its own env, LightX2V from a checkout, the CPU platform plugin.
#   make test-lightx2v LIGHTX2V_SRC=/path/to/LightX2V
LX_VENV      ?= .venv-lightx2v
LX_PY        := $(LX_VENV)/bin/python
LIGHTX2V_SRC ?=

$(LX_VENV)/.installed: integrations/lightx2v/cpu_platform/pyproject.toml Makefile
	test -x $(LX_PY) || python3 -m venv $(LX_VENV)
	$(LX_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LX_PY) -m pip install -q triton loguru einops omegaconf gguf imageio imageio-ffmpeg prometheus_client opencv-python-headless \
		safetensors pydantic 'diffusers>=0.42.1,<0.43' transformers accelerate av pyzmq decord ftfy numpy scipy pillow scikit-image pandas pytest \
		soundfile hypothesis pyarrow torchmetrics matplotlib lpips  # soundfile: lightx2v.infer (the launcher) imports it; the rest teacal's (toolkit) and its tests
	@# LightX2V imports torchaudio; no release here matches torch 2.14.1, and --no-deps keeps pip from swapping torch.
	$(LX_PY) -m pip install -q --no-deps torchaudio
	$(LX_PY) -m pip install -q --no-deps -e integrations/lightx2v/cpu_platform
	touch $@

.PHONY: test-lightx2v
test-lightx2v: $(LX_VENV)/.installed
	@test -n "$(LIGHTX2V_SRC)" || { echo "make test-lightx2v: set LIGHTX2V_SRC=/path/to/a/LightX2V/checkout" >&2; exit 2; }
	LIGHTX2V_SRC=$(abspath $(LIGHTX2V_SRC)) PYTHONPATH=.:$(abspath $(LIGHTX2V_SRC)) $(LX_PY) -m pytest -q -m lightx2v tests/test_lightx2v.py

# Peers on the same chart: calibrated TeaCache (calibrated on prompts/calib.jsonl) against diffusers' FirstBlockCache,
# MagCache, SeaCache and cache-dit's DBCache, measured in one sweep on the held-out prompts (same seeds, references,
# timing, metrics).   make compare [RUN=results/compare]
.PHONY: compare
compare: RUN = results/compare
COMPARE_METHODS ?= teacache fbcache magcache seacache dbcache

compare: install
	$(TEACAL) record $(RUN)/calib --prompts $(CALIB_PROMPTS)
	$(TEACAL) probe $(RUN)/calib
	$(TEACAL) fit $(RUN)/calib --out $(RUN)/calib-preset.json
	$(TEACAL) sweep $(RUN)/calib --out $(RUN)/calib-sweep --preset $(RUN)/calib-preset.json $(STATIC_BASELINES) --forecast none
	$(TEACAL) fit $(RUN)/calib --out $(RUN)/preset.json --oracle-from $(RUN)/calib-sweep
	$(TEACAL) record $(RUN)/heldout --prompts $(HELDOUT_PROMPTS)
	$(TEACAL) sweep $(RUN)/heldout --preset $(RUN)/preset.json $(COMPARE_METHODS:%=--method %)
	$(TEACAL) report $(RUN)/heldout
	@echo "report: $(RUN)/heldout/report/report.md"

# Retrain the embedded tiny model (about 20 min on one CPU thread): calib/weights/, docs/tiny/ (loss, edit success, samples).
train-tiny: install
	$(PY) -m calib.training.tiny train --out calib/tiny/weights/tiny-qwen-image-edit.safetensors --docs docs/tiny
	$(PY) -m calib.training.tiny evaluate --docs docs/tiny

# Regenerate integrations/lightx2v/qwen_image_tea.patch from a LightX2V tree where it is applied and edited:
#   make lightx2v-patch LIGHTX2V_TEA=/path/to/patched/LightX2V   (the patch is a plain `git diff` against f8aee98)
LIGHTX2V_TEA ?=
.PHONY: lightx2v-patch
lightx2v-patch:
	@test -n "$(LIGHTX2V_TEA)" || { echo "make lightx2v-patch: set LIGHTX2V_TEA=/path/to/a/LightX2V/tree/with/the/patch" >&2; exit 2; }
	cd $(LIGHTX2V_TEA) && git add -N lightx2v && git diff f8aee98 -- lightx2v > $(abspath integrations/lightx2v/qwen_image_tea.patch)
