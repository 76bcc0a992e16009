.PHONY: setup demo test lint format

setup:
	scripts/setup.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports && .venv/bin/mypy broker api drivers quotas billing

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
