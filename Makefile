# Two commands for a fresh Debian 12 machine (as root): `make demo` and `make test`.
.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/vdisk demo

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/python scripts/bench_nbd.py

clean:
	rm -rf .venv build *.egg-info
