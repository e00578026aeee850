# The README's two commands: `make main` (install, then train and compare the optimizers on
# Fashion-MNIST, offline) and `make test` (install, then run the tests). Both work on a fresh
# Debian machine as root.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# About 3 minutes on 2 CPUs: TENGraD, SGD, Adam and K-FAC (the main job's default optimizers) each
# train one epoch of 3C1F at width 16 / Dense 128, the size of the README's headline benchmark
# (benchmarks/time_to_accuracy.py --config cpu). `--optimizer tengrad` trains TENGraD alone.
MAIN_ARGS ?= --dataset fashion_mnist --model 3c1f --epochs 1 --width 16 --hidden 128 --eval-every 40

.PHONY: install install-examples system-deps main test bench

# Debian ships the original Fashion-MNIST files; TFDS prepares from them offline (tengrad_tf.data).
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if command -v apt-get >/dev/null; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "apt-get not found: install Debian's dataset-fashion-mnist or use a network for TFDS"; fi; \
	fi

# The package with what examples/ and benchmarks/ need besides it (matplotlib, tensorboard).
install-examples: system-deps
	$(PIP) install -q -e ".[examples]"

# The same, plus the test tools (the suite runs the examples and benchmarks too).
install: system-deps
	$(PIP) install -q -e ".[test]"

main: install-examples
	$(PYTHON) examples/train.py $(MAIN_ARGS)

# The suite in one worker per CPU, a test file per worker at a time (--dist loadfile keeps each
# file's module fixtures in one process): 32 minutes on 2 CPUs where one process took 53-59.
test: install
	$(PYTHON) -m pytest -q -n auto --dist loadfile tests

bench: install-examples
	$(PYTHON) benchmarks/step_time.py
