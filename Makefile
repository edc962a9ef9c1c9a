# The two entry points of the README, and the checks CI runs before the tests. All set up .venv on first use.
.PHONY: setup train test test-fast lint

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/lorakit train

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

# Lint and format check on src, tests, bench and scripts; types on src (configured in pyproject.toml).
lint: setup
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/ruff format --check src tests bench scripts
	.venv/bin/mypy src
