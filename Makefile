# imagesmith: `make image` sets everything up and builds the example image;
# `make test` sets everything up and runs the whole test suite (as root), then
# the unit tests under trixie's Python 3.13 (`make test-trixie`).

VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
OUT ?= out
IMAGE ?=
# Debian packages the build and the tests need on the build host.
HOST_PACKAGES = mmdebstrap util-linux fdisk e2fsprogs btrfs-progs dosfstools mtools \
	qemu-system-x86 qemu-utils ovmf seabios zstd skopeo umoci python3-venv debian-archive-keyring \
	openssl gnupg openssh-client fai-doc docker-registry sbsigntool \
	softhsm2 libengine-pkcs11-openssl

.PHONY: setup host-packages image test test-trixie lint docs bench clean

setup: host-packages $(VENV)/.installed

host-packages:
	@missing=$$(for p in $(HOST_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing host packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

image: setup
	$(BIN)/imagesmith build -C examples -o $(OUT) $(IMAGE)

test: setup
	$(BIN)/python -m pytest
	$(MAKE) test-trixie

# The unit tests again under Debian trixie's Python 3.13, in a small trixie
# tree made once with mmdebstrap and cached (tests/run_in_trixie.py).
test-trixie: setup
	$(BIN)/python tests/run_in_trixie.py -q

# The benchmark (as root, on a quiet machine; about 20 minutes with 3 runs):
# prints a markdown table and stores it in BENCHMARKS.md.
bench: setup
	$(BIN)/python bench/run.py --write BENCHMARKS.md $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check imagesmith tests bench
	$(BIN)/ruff format --check imagesmith tests bench
	$(BIN)/mypy

docs: setup
	$(BIN)/python -m imagesmith.config.reference > docs/config-reference.md

clean:
	rm -rf $(OUT) $(VENV) *.egg-info
