# The two set-up commands of the README:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision first, pinned to the builds CI uses (CUDA wheels on x86-64 Linux, also fine on a CPU);
# override on a GPU box whose driver wants another build:  make demo TORCH="torch==X torchvision==Y"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= demo
# SkyPilot pins click<8.2, which breaks huggingface_hub's CLI: it lives in a venv of its own, used by the
# tests only to parse deploy/aws/*.yaml with SkyPilot's own loader.
SKY    ?= .venv-sky

.PHONY: install demo test clean-demo

$(SKY)/bin/.installed:
	$(PYTHON) -m venv $(SKY)
	$(SKY)/bin/pip install -q 'skypilot>=0.14'
	touch $@

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Synthetic ImageNet-schema parquet -> WebDataset shards -> ResNet-50 training on the CPU (a few minutes on
# 2 cores) -> top-1 -> Grad-CAM grid of the most confident mistakes + training curves. Re-running resumes.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m preprocess.synthetic --out $(DEMO)/parquet
	HF_HUB_OFFLINE=1 $(BIN)/python -m preprocess.shard --src $(DEMO)/parquet --out $(DEMO)/shards --images-per-shard 250
	$(BIN)/python -m train.main --data $(DEMO)/shards --out $(DEMO)/run --config smoke
	$(BIN)/python -m viz.gradcam --checkpoint $(DEMO)/run/checkpoints/best.pt --data $(DEMO)/shards \
		--output $(DEMO)/gradcam.png --num-show 6
	$(BIN)/python -m viz.plots $(DEMO)/run --output $(DEMO)/curves.png
	$(BIN)/python -m viz.report $(DEMO)/run --data $(DEMO)/shards --output $(DEMO)/report

test: install $(SKY)/bin/.installed
	HF_HUB_OFFLINE=1 SKYPILOT_PYTHON=$(abspath $(SKY))/bin/python $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)
