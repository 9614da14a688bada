# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean docs docs-serve mutation leaderboard detection-table forecast-table distill-table quantize-table

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/clbench run --strategy er --scenario digits-5

# One pytest-xdist worker per core (JOBS=0: all in one process), each with one intra-op thread
# (tests/conftest.py): twice as many threads as cores thrash on the 2-core CI machine.
TEST_JOBS = $(or $(JOBS),$(shell nproc 2>/dev/null || echo 2))
PYTEST = WANDB_MODE=offline MPLBACKEND=Agg OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n $(TEST_JOBS) --dist loadgroup

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The documentation site (docs/, mkdocs.yml) into build/site, warnings as errors; tests/test_docs.py
# builds it too, so `make test` checks it. docs-serve rebuilds on every change (http://127.0.0.1:8000).
MKDOCS = NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs
docs: $(STAMP)
	$(MKDOCS) build --strict --site-dir build/site

docs-serve: $(STAMP)
	$(MKDOCS) serve

# Mutation testing of the tests (a benchmark, not part of `make test`): mutmut on a scratch copy of the
# tree, each mutant run against the tests mapped to its file, one at a time with a per-mutant timeout;
# reports in docs/mutation/<file>.md and the kill-score table in docs/mutation/README.md.
# `make mutation` runs the default set (buffers, heads, teacher snapshots, metrics, FLOP counter); `make mutation FILE=strategies/lord.py` one file.
mutation: $(STAMP)
	$(BIN)/python scripts/mutation.py $(FILE)

# Generated result tables: each target runs real sweeps and splices its Markdown between the
# `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers of the file that shows it.
# The README's headline table: every registered strategy on digits-5 and synthetic32-3, seeds 0-2.
leaderboard: $(STAMP)
	mkdir -p results
	$(BIN)/python scripts/readme_leaderboard.py --jobs $(or $(JOBS),1) > results/readme-leaderboard.md
	$(BIN)/python scripts/splice_readme.py README.md leaderboard results/readme-leaderboard.md

# docs/detection.md: IOR, ERD, P2IOD and CL-DETR beside their fine-tuning lower bounds on ShapesIOD, seeds 0-2.
detection-table: $(STAMP)
	mkdir -p results
	$(BIN)/python scripts/readme_leaderboard.py --output-dir results/detection \
		--grid shapes-2+2-absent=ior,erd,gfl_finetune --grid shapes-2+2=p2iod,cl_detr,detr_finetune,erd,gfl_finetune > results/readme-detection.md
	$(BIN)/python scripts/splice_readme.py docs/detection.md detection results/readme-detection.md

# docs/forecasting.md: the STELLA-like MLP with and without replay, seeds 0-2.
forecast-table: $(STAMP)
	mkdir -p results
	$(BIN)/python scripts/readme_leaderboard.py --output-dir results/forecast \
		--grid co2-4=stella_mlp,stella_er --grid ts-domains-4=stella_mlp,stella_er \
		--grid macro-vars-4=stella_mlp,stella_er > results/readme-forecast.md
	$(BIN)/python scripts/splice_readme.py docs/forecasting.md forecasting results/readme-forecast.md

# docs/addons.md: ER alone and with each distillation add-on, seeds 0-2.
distill-table: $(STAMP)
	mkdir -p results
	$(BIN)/python scripts/readme_leaderboard.py --output-dir results/distill --grid digits-5=er \
		--add-ons none --add-ons logit_kd --add-ons logit_mse --add-ons feature_kd --add-ons relation_kd \
		--add-ons multi_teacher:policy=task_owner --add-ons multi_teacher:policy=rl > results/readme-distill.md
	$(BIN)/python scripts/splice_readme.py docs/addons.md distillation results/readme-distill.md

# docs/addons.md: ER alone and with the quantize add-on at several bit-widths and calibrations, seeds 0-2.
quantize-table: $(STAMP)
	mkdir -p results
	$(BIN)/python scripts/readme_leaderboard.py --output-dir results/quantize --grid digits-5=er \
		--add-ons none --add-ons quantize:preset=W8A8 --add-ons quantize:preset=W4A4 --add-ons quantize:preset=W2A4 \
		--add-ons quantize:preset=W2A4,mixed=kurtosis --add-ons quantize:preset=W4A4,smooth=hadamard_channel \
		--add-ons quantize:preset=W2A4,quantize_first_last=true \
		--add-ons quantize:preset=W2A4,quantize_first_last=true,distill_steps=100 > results/readme-quantize.md
	$(BIN)/python scripts/splice_readme.py docs/addons.md quantization results/readme-quantize.md

clean:
	rm -rf $(VENV) build *.egg-info
