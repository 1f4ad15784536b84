# Two commands for a new user: `make serve` and `make test`. Both create the virtual
# environment on first use (torch first, from the pinned CPU wheel) and then run.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint proto train-shipped train-encoder clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/gated serve

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check models service tests benchmarks
	$(BIN)/mypy service models

# Recompiles the gRPC protocol's descriptor set after an edit of service/grpc/grpc_service.proto.
proto: $(STAMP)
	cd service/grpc && ../../$(BIN)/python -m grpc_tools.protoc -I. \
		--descriptor_set_out=grpc_service.binpb grpc_service.proto

# Rebuilds the shipped checkpoint exactly as committed (about 4 minutes on 2 CPU cores).
train-shipped: $(STAMP)
	$(BIN)/gated train --config models/configs/mnist1d_conv.yaml --out models/pretrained/mnist1d-conv

# Rebuilds the shipped Hugging Face encoder: a Wav2Vec2 classifier trained dense on MNIST-1D
# (the user's pretrained model), retrofitted, its predictors fitted with the base frozen.
train-encoder: $(STAMP)
	$(BIN)/python benchmarks/retrofit_accuracy.py --hf-config models/configs/mnist1d_wav2vec2.json \
		--seeds 0 --epochs 30 --fit-epochs 8 --ship models/encoders/mnist1d-wav2vec2 \
		--name retrofit_shipped

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
