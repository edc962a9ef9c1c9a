# The two entry points of the README. Both set up .venv on first use.
.PHONY: setup train test test-fast

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/lorakit train

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
