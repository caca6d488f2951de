# teacal: `make demo` runs the main job (teacal calibrate, then teacal evaluate) on the tiny model; `make test` runs the tests.
# Both install into .venv first when needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TEACAL  := $(VENV)/bin/teacal
RUN     ?= results/demo
STAMP   := $(VENV)/.installed
# The tiny model's tensors are small: one thread per process is as fast on 2 cores, and several processes
# (sharded record, tests that spawn the CLI) no longer fight over them. Override with OMP_NUM_THREADS=N.
export OMP_NUM_THREADS ?= 1

.PHONY: install test lint bench bench-real demo report train-tiny train-scenes train-distilled

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

# The main job on the embedded tiny model: calibrate on prompts/calib.jsonl under the default budget of calls (record,
# probe, fit), then measure the preset on prompts/heldout.jsonl, which it never saw, against a borrowed set, LeMiCa and
# FirstBlockCache, and write the report (it leads with the threshold to use). The oracle and the plain-reuse front are
# left to make eval. Both commands run as DEMO_PROCS processes under torchrun (each a share of the prompts, the same
# preset and report as one process; only rank 0 prints): on 2 cores one process left a core idle, 6.7 minutes.
CALIB_PROMPTS   ?= prompts/calib.jsonl
HELDOUT_PROMPTS ?= prompts/heldout.jsonl
DEMO_EVALUATE   ?= --baseline identity --baseline mlx-qwen --baseline lemica --method teacache --method fbcache --no-oracle --no-plain-reuse
DEMO_PROCS      ?= 2
DEMO_TEACAL     := $(PY) -m torch.distributed.run --standalone --nproc-per-node $(DEMO_PROCS) --local-ranks-filter 0 --module calib.cli

demo: install
	$(DEMO_TEACAL) calibrate $(RUN)/calib --prompts $(CALIB_PROMPTS)
	$(DEMO_TEACAL) evaluate $(RUN)/heldout --preset $(RUN)/calib/preset.json --prompts $(HELDOUT_PROMPTS) $(DEMO_EVALUATE)

# The evidence behind the README's tables, for either embedded model: calibrate on its calibration prompts under
# EVAL_BUDGET calls, then evaluate on its held-out prompts (never used to calibrate or tune) against every borrowed
# set, uniform spacing, LeMiCa, FirstBlockCache and MagCache, with and without a calibrated forecast.
#   make eval                                            the tiny model at 20 and 40 steps
#   make eval MODEL=scenes-qwen-image-edit               the scenes model at 50 steps (prompts/scenes/)
#   make eval MODEL=scenes-qwen-image-edit-8step         its distilled students, CFG off, at 8 (or -4step: 4) steps
MODEL       ?= tiny-qwen-image-edit
EVAL        ?= results/eval/$(MODEL)
EVAL_STEPS  ?= $(if $(filter scenes-qwen-image-edit,$(MODEL)),50,$(if $(filter %step,$(MODEL)),$(patsubst scenes-qwen-image-edit-%step,%,$(MODEL)),20 40))
EVAL_BUDGET ?= 10000
EVAL_PROMPTS = $(if $(findstring scenes,$(MODEL)),prompts/scenes/,prompts/)

.PHONY: eval ladder
eval: install
	$(TEACAL) calibrate $(EVAL)/calib --model $(MODEL) --prompts $(EVAL_PROMPTS)calib.jsonl $(EVAL_STEPS:%=--steps %) --budget $(EVAL_BUDGET)
	$(TEACAL) evaluate $(EVAL)/heldout --preset $(EVAL)/calib/preset.json --prompts $(EVAL_PROMPTS)heldout.jsonl
	@echo "reports: $(EVAL)/heldout/sweep-*/report/report.md"

# What calibration costs against what it buys: calibrate at each rung of teacal calibrate's ladder (LADDER_BUDGETS,
# calls) and measure each preset on the held-out prompts (docs/eval/ladder.py writes the table).
LADDER_BUDGETS ?= 1500 2300 3100 6000 40000
# The full calibration beside the rungs: the shipped tiny preset is one (record, probe, fit, sweeps, tune; 2026-12-04).
FULL_PRESET ?= $(if $(filter tiny-qwen-image-edit,$(MODEL)),presets/tiny-qwen-image-edit.json,)
ladder: install
	for b in $(LADDER_BUDGETS); do \
		$(TEACAL) calibrate $(EVAL)/ladder-$$b --model $(MODEL) --prompts $(EVAL_PROMPTS)calib.jsonl $(EVAL_STEPS:%=--steps %) --budget $$b || exit 1; \
	done
	$(PY) docs/eval/ladder.py $(EVAL) --prompts $(EVAL_PROMPTS)heldout.jsonl $(EVAL_STEPS:%=--steps %) $(LADDER_BUDGETS:%=--budget %) \
		$(if $(FULL_PRESET),--full $(FULL_PRESET))

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

# Retrain the embedded models (one CPU thread): the tiny one in about 20 minutes (calib/tiny/weights/, docs/tiny/: loss,
# edit success, samples); the scenes one in about 90 (docs/scenes/: loss, VAE, samples at several seeds).
train-tiny: install
	$(PY) -m calib.training.tiny train --out calib/tiny/weights/tiny-qwen-image-edit.safetensors --docs docs/tiny
	$(PY) -m calib.training.tiny evaluate --docs docs/tiny

train-scenes: install
	$(PY) -m calib.training.scenes train --out calib/tiny/weights/scenes-qwen-image-edit.safetensors --docs docs/scenes
	$(PY) -m calib.training.scenes samples --docs docs/scenes

# The scenes model distilled to 8 and 4 steps with CFG off (about 15 minutes each on one thread; docs/scenes/)
train-distilled: install
	$(PY) -m calib.training.distill train --steps 8
	$(PY) -m calib.training.distill train --steps 4

# Regenerate integrations/lightx2v/qwen_image_tea.patch from a LightX2V tree where it is applied and edited:
#   make lightx2v-patch LIGHTX2V_TEA=/path/to/patched/LightX2V   (the patch is a plain `git diff` against f8aee98)
LIGHTX2V_TEA ?=
.PHONY: lightx2v-patch
lightx2v-patch:
	@test -n "$(LIGHTX2V_TEA)" || { echo "make lightx2v-patch: set LIGHTX2V_TEA=/path/to/a/LightX2V/tree/with/the/patch" >&2; exit 2; }
	cd $(LIGHTX2V_TEA) && git add -N lightx2v && git diff f8aee98 -- lightx2v > $(abspath integrations/lightx2v/qwen_image_tea.patch)
