# The two commands a new user needs:
#   make run    set up (apt, .venv, editable install with the Rust extension) and run the main job
#   make test   set up and run the test suite
PY := .venv/bin/python

.PHONY: run test test-slow lint bench-headroom bench-learning bench-ope bench bench-outer bench-utility bench-unex bench-offline bench-cycle bench-recommend bench-multinode bench-chaos cycle train train-utility train-unex train-offline bootstrap serve serve-recommend clean
run: bootstrap
	$(PY) scripts/main_job.py

# the suite is CPU-bound (Ray worker starts, simulations): two pytest-xdist workers, each with its own local Ray,
# keep both cores busy (~24 % less wall time here than one); a test module stays on one worker (its Serve apps)
TEST_WORKERS ?= 2
test: bootstrap
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-slow: bootstrap
	$(PY) -m pytest -m slow

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: bootstrap
	EXTRA_APT=wrk bash scripts/bootstrap.sh
	$(PY) benchmarks/inner_reward.py
	$(PY) benchmarks/world.py
	$(PY) benchmarks/telemetry.py

bench-headroom: bootstrap
	$(PY) benchmarks/headroom.py

bench-learning: bootstrap
	$(PY) benchmarks/learning_outer_controller.py
	$(PY) benchmarks/learning_utility_agent.py
	$(PY) benchmarks/learning_unex_rl.py

bench-ope: bootstrap
	$(PY) benchmarks/ope_coverage.py
	$(PY) benchmarks/crm.py

bench-outer: bootstrap
	$(PY) benchmarks/layered_vs_monolithic.py

bench-utility: bootstrap
	$(PY) benchmarks/utility_agent.py

bench-unex: bootstrap
	$(PY) benchmarks/unex_rl.py
	$(PY) benchmarks/unex_rl_sensitivity.py

bench-recommend: bootstrap
	$(PY) benchmarks/recommend.py

bench-multinode: bootstrap
	$(PY) benchmarks/multinode.py

bench-chaos: bootstrap
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/chaos_training.py
	$(PY) benchmarks/chaos_replay.py

bench-cycle: bootstrap
	$(PY) benchmarks/gate_power.py
	$(PY) benchmarks/daily_cycle.py

cycle: bootstrap
	$(PY) -m rllib_policies.daily_cycle --config rllib_policies/configs/daily_cycle.yaml

train-unex: bootstrap
	$(PY) -m rllib_policies.train_unex_rl --config rllib_policies/configs/unex_rl.yaml

bench-offline: bootstrap
	$(PY) benchmarks/offline_rl.py --jobs 2

train-offline: bootstrap
	$(PY) -m rllib_policies.train_offline --config rllib_policies/configs/offline_bcq.yaml

train-utility: bootstrap
	$(PY) -m rllib_policies.train_utility_agent --config rllib_policies/configs/utility_agent.yaml

train: bootstrap
	$(PY) -m rllib_policies.train_outer_controller --config rllib_policies/configs/outer_controller.yaml

serve: bootstrap
	$(PY) -m serve_apps.launch serve_apps/configs/inner_reward.yaml --block

serve-recommend: bootstrap
	$(PY) -m serve_apps.launch serve_apps/configs/recommend.yaml --block

bootstrap:
	bash scripts/bootstrap.sh

clean:
	rm -rf .venv target rust_ext/*.so .pytest_cache .hypothesis
