# The README's two commands: `make main` (install, then train on Fashion-MNIST offline) and
# `make test` (install, then run the tests). Both work on a fresh Debian machine as root.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
MAIN_ARGS ?= --dataset fashion_mnist --model 3c1f --optimizer tengrad --epochs 1 --width 32 --steps-per-epoch 150 --eval-every 30

.PHONY: install system-deps main test bench

# Debian ships the original Fashion-MNIST files; TFDS prepares from them offline (tengrad_tf.data).
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if command -v apt-get >/dev/null; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "apt-get not found: install Debian's dataset-fashion-mnist or use a network for TFDS"; fi; \
	fi

install: system-deps
	$(PIP) install -q -e ".[test]"

main: install
	$(PYTHON) examples/train.py $(MAIN_ARGS)

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/step_time.py
