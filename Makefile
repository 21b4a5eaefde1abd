.PHONY: demo test setup up down

demo: setup  ## Start the local services, publish a real conversation, show what memstream does.
	.venv/bin/memstream demo

test:  ## Set up, start the services, run lint and the whole test suite, stop the services.
	bash infra/test.sh

setup:
	bash infra/setup.sh

up: setup
	.venv/bin/memstream infra up

down:
	.venv/bin/memstream infra down
