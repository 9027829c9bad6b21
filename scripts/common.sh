# Shared by scripts/test and scripts/run-dev: a virtualenv with the project installed,
# and the system packages the project needs, installed by name only when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_debian_package() {  # need_debian_package BINARY PACKAGE...
	command -v "$1" >/dev/null 2>&1 && return 0
	echo "installing $2 (no $1 on this machine)" >&2
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${@:2}" >/dev/null
}

python_for() {  # python_for 3.10 -> a python of that version if the machine has one, else python3
	local wanted="$1" candidate
	for candidate in "python$wanted" "$HOME/.pyenv/versions/$wanted"*/bin/python"$wanted"; do
		if "$candidate" -c 'import sys' >/dev/null 2>&1; then echo "$candidate"; return; fi
	done
	echo python3
}

newest_python() {  # the newest Python 3 the machine has (3.12 or later), else python3
	local version candidate
	for version in 3.14 3.13 3.12; do
		candidate="$(python_for "$version")"
		if [ "$candidate" != python3 ]; then echo "$candidate"; return; fi
	done
	echo python3
}

make_venv() {  # make_venv DIR PYTHON [pip args...]: create or update a virtualenv
	local dir="$1" python="$2"
	shift 2
	[ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
	"$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
	"$dir/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" "$@"
}

redis_answers() {  # redis_answers PORT
	python3 - "$1" <<'PY'
import socket, sys
try:
	with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
		s.sendall(b"PING\r\n")
		sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
	sys.exit(1)
PY
}

ensure_redis() {  # a Redis on 127.0.0.1:6379 for the default configuration
	need_debian_package redis-server redis-server
	redis_answers 6379 && return 0
	echo "starting redis-server on 127.0.0.1:6379" >&2
	redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp >/dev/null
	for _ in $(seq 50); do redis_answers 6379 && return 0; sleep 0.1; done
	echo "redis-server did not start" >&2
	return 1
}
