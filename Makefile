# Two commands for a new machine: `make demo` (train + evaluate on real digits) and `make test`.
# Both set up what they need: the active virtualenv if there is one, else ./.venv.

VENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON   := $(VENV_DIR)/bin/python
STAMP    := $(VENV_DIR)/.swin-requirements
DEMO_DIR ?= demo_data/digits
DEMO_OUT ?= output/demo

.PHONY: setup demo test gpu-check clean-demo pillow-simd

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
