# Two set-up commands (README): `make train` and `make test`. Each creates .venv and
# installs what it needs from nothing; torch comes from this machine's local wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
LEROBOT_PIN := lerobot==0.4.4
EXP ?= quickstart

.PHONY: train test test-fast install-jax install-dev clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.jax-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[jax]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	# The matched CUDA-build pair runs on the CPU and comes from local wheels (DESIGN.md).
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[jax,torch,data,serve,wandb,dev]'
	# lerobot caps torch<2.11: install it without its pins (its dataset needs are in the data extra).
	$(PIP) install -q --no-deps $(LEROBOT_PIN)
	touch $@

install-jax: $(VENV)/.jax-installed
install-dev: $(VENV)/.dev-installed

# The main job: train cartpole_ppo on the JAX backend, print where checkpoints and logs went.
train: install-jax
	$(PY) scripts/train.py cartpole_ppo --backend jax --exp-name $(EXP) --overwrite

# The whole suite, slow end-to-end tests included (what CI runs).
test: install-dev
	$(PY) -m pytest -q

# Everything but the slow end-to-end tests.
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) checkpoints
