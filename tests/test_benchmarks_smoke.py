"""The benchmark runner still works end to end: a small S1 (with recovery off and on) and a
small jwt storm, for the product on both backends, the Node reference and the python-socketio baseline, with
no lost deliveries and no failed connects; the floor under S1 and S2 (``floor.py``); and the
log's Redis work per event (``log_calls.py``)."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import REPO


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
	"""Run ``benchmarks/<script>`` with ``args`` from the repository, and check it succeeded."""
	result = subprocess.run(
		[sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
	)
	assert result.returncode == 0, result.stderr[-3000:]
	return result


def test_quick_benchmark_runs_for_every_server():
	result = run_benchmark("run.py", "--quick", "--scenarios", "S1,S1r,S3j", "--servers", "product,gevent,reference,baseline", timeout=600)
	path = REPO / result.stdout.strip().splitlines()[-1].removeprefix("full results: ")
	cases = json.loads(path.read_text())["results"]
	for scenario in ("S1", "S1r", "S3j"):
		for server in ("product", "gevent", "reference", "baseline"):
			(case,) = cases[scenario][server]
			assert "error" not in case, (scenario, server, case.get("error"))
			assert case["connect"]["failed"] == 0, (scenario, server)
			assert case["exit_code"] == 0, (scenario, server)
	for scenario in ("S1", "S1r"):
		for server in ("product", "gevent"):
			s1 = cases[scenario][server][0]["deliveries"]
			assert s1["received"] == s1["expected"] > 0, (scenario, server)
	assert cases["S1"]["reference"][0]["deliveries"]["lost"] == 0
	assert cases["S1"]["baseline"][0]["deliveries"]["lost"] == 0


def test_quick_floor_writes_every_delivery_of_its_scenarios():
	"""``floor.py`` writes each scenario's frame to every client of each event's room: as
	many writes as the scenario has deliveries, each answered by the clients reading them."""
	sys.path.insert(0, str(REPO / "benchmarks"))
	from run import scenarios

	result = run_benchmark("floor.py", "--quick", timeout=120)
	catalogue = scenarios(quick=True)
	runs = dict(line.strip().split(": ", 1) for line in result.stderr.splitlines() if line.startswith("  S"))
	assert sorted(runs) == ["S1", "S2"], result.stderr[-3000:]
	for name, text in runs.items():
		(run,) = json.loads(text)
		assert run["deliveries"] == catalogue[name].expected > 0, name
		assert run["cpu_us_per_delivery"] > 0, name
	assert [row.split(" | ")[0] for row in result.stdout.splitlines()[2:]] == ["| S1", "| S2"]


def test_quick_log_calls_times_each_step_of_an_event():
	"""``log_calls.py`` makes each of an event's Redis round trips through the product's own
	code (it stops with an error when a read does not return the one entry, a message is
	not read back, or the ingester did not log it) and prints the time of each. (The pub/sub
	read's is a difference of two timings, which a quick run's few calls leave too noisy to
	check.)"""
	result = run_benchmark("log_calls.py", "--quick", timeout=120)
	medians = json.loads(result.stderr.strip().splitlines()[-1])
	timed = ["append and read back (Lua, leading, decode)", "append to the log (Lua, lease held)", "read of the log (XREAD, decode)"]
	assert sorted(medians) == sorted([*timed, "pub/sub read"])
	assert all(medians[name] > 0 for name in timed), medians
	assert [row.split(" | ")[0] for row in result.stdout.splitlines()[-2:]] == ["| the leading process: pub/sub read, append and read back", "| any other process: pub/sub read, read of the log"]


def test_log_calls_keeps_the_lease_through_a_long_run():
	"""A run longer than the ingest lease keeps timing the leading process's call, as a
	server renews its lease while it runs: here the lease is cut to 0.2 s, which the run's
	rounds outlast many times over."""
	program = (
		"import eventlet; eventlet.monkey_patch(); import runpy, sys;"
		"from excel_restaurant_pos.realtime import ingest; ingest.LEASE_MS = 200;"
		"sys.argv = ['log_calls.py', '--calls', '60', '--rounds', '6'];"
		"runpy.run_path('benchmarks/log_calls.py', run_name='__main__')"
	)
	result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
	assert result.returncode == 0, result.stderr[-3000:]
	assert "lost the lease" not in result.stderr
	assert json.loads(result.stderr.strip().splitlines()[-1])["append and read back (Lua, leading, decode)"] > 0
