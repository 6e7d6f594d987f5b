# Two commands for a new machine: `make demo` (train + evaluate on real digits) and `make test`.
# Both set up what they need: the active virtualenv if there is one, else ./.venv.

VENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON   := $(VENV_DIR)/bin/python
STAMP    := $(VENV_DIR)/.swin-requirements
DEMO_DIR ?= demo_data/digits
DEMO_OUT ?= output/demo

.PHONY: setup demo test test-torch gpu-check gpu-wheels clean-demo pillow-simd

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PYTHON) || python3 -m venv $(VENV_DIR)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

demo: setup
	@test -d $(DEMO_DIR)/train || $(PYTHON) tools/prepare_digits.py $(DEMO_DIR)
	$(PYTHON) main.py --cfg configs/demo/swin_micro_digits.yaml --data-path $(DEMO_DIR) --output $(DEMO_OUT)
	$(PYTHON) main.py --cfg configs/demo/swin_micro_digits.yaml --data-path $(DEMO_DIR) --output $(DEMO_OUT) --eval
	$(PYTHON) main.py --cfg configs/demo/swin_micro_digits.yaml --data-path $(DEMO_DIR) --output $(DEMO_OUT) \
		--throughput --batch-size 64 --disable_amp

# The suite, its files spread over the cores (pytest-xdist; a file's tests stay in one worker: they share fixtures)
# (slowest files first: tests/conftest.py)
test: setup
	$(PYTHON) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

# The whole suite on another torch release, in its own virtualenv .venv-torch-X (built once, ~5 GB):
#   make test-torch TORCH=2.11.0 [TIMM=1.0.14]
# torchvision follows torch (2.N.p -> 0.(N+15).p); TIMM pins timm too (default: the newest the range allows).
TORCH ?=
TIMM ?=
TORCH_VENV = .venv-torch-$(TORCH)$(if $(TIMM),-timm-$(TIMM))
TORCHVISION = $(shell echo $(TORCH) | awk -F. '{printf "0.%d.%s", $$2 + 15, ($$3 == "" ? 0 : $$3)}')

test-torch:
	@test -n "$(TORCH)" || { echo "usage: make test-torch TORCH=2.11.0 [TIMM=1.0.14]" >&2; exit 2; }
	@test -x $(TORCH_VENV)/bin/python || python3 -m venv $(TORCH_VENV)
	@test -f $(TORCH_VENV)/.swin-requirements -a $(TORCH_VENV)/.swin-requirements -nt requirements.txt || { \
		printf 'torch==%s\ntorchvision==%s\n%s\n' $(TORCH) $(TORCHVISION) "$(if $(TIMM),timm==$(TIMM))" \
			> $(TORCH_VENV)/pins.txt && \
		$(TORCH_VENV)/bin/python -m pip install --quiet -r requirements.txt \
			-c $(TORCH_VENV)/pins.txt && touch $(TORCH_VENV)/.swin-requirements; }
	$(TORCH_VENV)/bin/python -c "import torch, torchvision, timm; print('torch', torch.__version__, \
		'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(TORCH_VENV)/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

# The GPU paths in one command (benchmarks/gpu_check.py: attention kernels, parity and speed against timm, the
# paper's throughput, main.py under torchrun with NCCL, DDP/FSDP, resume, --compile), under 8 minutes on one H100;
# report.json and gpu_check.log in GPU_CHECK_OUT. No set-up: on a bare GPU machine (no .venv) it runs python3 with
# the torch installed there, and the wheels of `make gpu-wheels` in .whl/. Without a GPU it says so in one line.
GPU_CHECK_OUT ?= output/gpu_check
GPU_PYTHON = $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT)

# The pure-Python packages the code imports at run time that a bare GPU machine lacks (it has torch, torchvision,
# timm, pyyaml, tensorboard, numpy, pillow), as wheels for its Python 3.12 in .whl/ (git-ignored), to carry there.
GPU_WHEELS ?= yacs==0.1.8 termcolor==3.3.0
gpu-wheels:
	rm -f $(foreach w,$(GPU_WHEELS),.whl/$(firstword $(subst ==, ,$(w)))-*.whl)
	$(GPU_PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@ls .whl

# Optional: swap Pillow for pillow-simd (needs libjpeg and zlib headers; builds in about a minute).
pillow-simd: setup
	$(PYTHON) -m pip uninstall -y pillow
	$(PYTHON) -m pip install --no-cache-dir -r requirements-fast.txt

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_OUT)
