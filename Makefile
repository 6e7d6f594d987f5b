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

test: setup
	$(PYTHON) -m pytest -q tests

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
	@test -f $(TORCH_VENV)/.swin-requirements || { \
		printf 'torch==%s\ntorchvision==%s\n%s\n' $(TORCH) $(TORCHVISION) "$(if $(TIMM),timm==$(TIMM))" \
			> $(TORCH_VENV)/pins.txt && \
		$(TORCH_VENV)/bin/python -m pip install --quiet -r requirements.txt \
			-c $(TORCH_VENV)/pins.txt && touch $(TORCH_VENV)/.swin-requirements; }
	$(TORCH_VENV)/bin/python -c "import torch, torchvision, timm; print('torch', torch.__version__, \
		'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(TORCH_VENV)/bin/python -m pytest -q tests

# The GPU paths (fp16/bf16 steps against timm, torch.compile, main.py under torchrun with NCCL) in one command
# for a machine with a GPU, under 8 minutes; elsewhere it says there is no GPU.
gpu-check: setup
	$(PYTHON) -m benchmarks.gpu_check

# Optional: swap Pillow for pillow-simd (needs libjpeg and zlib headers; builds in about a minute).
pillow-simd: setup
	$(PYTHON) -m pip uninstall -y pillow
	$(PYTHON) -m pip install --no-cache-dir -r requirements-fast.txt

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_OUT)
