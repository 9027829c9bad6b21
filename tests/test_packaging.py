"""What ``pip install`` asks for: everything standalone; inside a bench, nothing that Frappe
pins itself (bench's ``--upgrade`` install would otherwise move Frappe's versions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness import REPO

FRAPPE_PINNED = {"redis", "requests", "pyjwt", "click"}


def requested(project: Path, extra: str | None = None) -> set[str]:
	"""The distribution names the project requires (with ``extra``: those only that extra
	adds), from pip's own resolution report."""
	result = subprocess.run(
		[sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--report", "-", "-e", str(project)],
		capture_output=True,
		text=True,
		timeout=180,
	)
	assert result.returncode == 0, result.stderr[-2000:]
	(item,) = json.loads(result.stdout)["install"]
	marker = f'extra == "{extra}"' if extra else None
	return {
		requirement.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].split("!")[0].strip().lower()
		for requirement in item["metadata"]["requires_dist"]
		if (marker in requirement if marker else "extra ==" not in requirement)
	}


def copy_project(target: Path) -> Path:
	for name in ("setup.py", "requirements.txt", "requirements-gevent.txt", "README.md", "MANIFEST.in", "license.txt"):
		shutil.copy(REPO / name, target / name)
	shutil.copytree(REPO / "excel_restaurant_pos", target / "excel_restaurant_pos", ignore=shutil.ignore_patterns("__pycache__"))
	return target


def test_standalone_install_requires_everything(tmp_path):
	names = requested(copy_project(tmp_path))
	assert names >= FRAPPE_PINNED | {"python-socketio", "eventlet", "prometheus_client", "websocket-client"}
	assert "gevent" not in names


def test_the_gevent_backend_is_an_extra(tmp_path):
	"""A bench that stays on eventlet gets nothing new; ``[gevent]`` brings the backend."""
	assert requested(copy_project(tmp_path), extra="gevent") == {"gevent", "gevent-websocket"}


def test_bench_install_leaves_frappes_pins_alone(tmp_path):
	bench = tmp_path / "frappe-bench"
	(bench / "sites").mkdir(parents=True)
	(bench / "sites" / "common_site_config.json").write_text("{}")
	app = bench / "apps" / "excel_restaurant_pos"
	app.mkdir(parents=True)
	names = requested(copy_project(app))
	assert names & FRAPPE_PINNED == set()
	assert names >= {"python-socketio", "eventlet", "prometheus_client"}
