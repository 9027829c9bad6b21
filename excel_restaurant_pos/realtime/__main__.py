"""``python -m excel_restaurant_pos.realtime``: start the realtime server, or run one of the
``excel-pos`` commands (``… token USER``, ``… listen``; see :mod:`excel_restaurant_pos.commands`).

Running the server is the default: any arguments that do not start with a command name are
its flags. The backend's monkey-patching (eventlet's or gevent's) happens here, for the
server only and before anything it patches is imported, so that importing the package
elsewhere (Frappe, tests, scripts, the commands) changes nothing.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
	argv = sys.argv[1:] if argv is None else argv
	if argv and not argv[0].startswith("-"):
		from excel_restaurant_pos.commands import run_standalone

		return run_standalone(argv)
	return run_server(argv)


def run_server(argv: list[str]) -> int:
	import os

	from excel_restaurant_pos.realtime import backend
	from excel_restaurant_pos.realtime.config import ConfigError, load_config

	args = vars(parse_args(argv))
	bench, dev = args.pop("bench"), args.pop("dev")
	env = dict(os.environ)
	if dev:
		from excel_restaurant_pos.realtime import dev as development

		env.setdefault("EXCEL_RESTAURANT_POS_JWT_SECRET", development.DEV_SECRET)
	try:
		# Reading the configuration imports nothing the patch changes, and says which
		# backend patches.
		config = load_config(args, bench=bench, env=env)
		backend.load(config.async_mode).monkey_patch()
		if dev and args.get("host") is None and not env.get("EXCEL_RESTAURANT_POS_SOCKETIO_HOST"):
			config = development.local_only(config)
			development.ensure_redis(config.redis_queue)
			print(development.banner(config), file=sys.stderr)
	except ConfigError as exc:
		print(f"excel_restaurant_pos realtime: configuration error: {exc}", file=sys.stderr)
		return 2

	import logging

	logging.basicConfig(
		level=config.log_level.upper(),
		format="%(asctime)s %(levelname)s %(name)s: %(message)s",
		stream=sys.stderr,
	)
	from excel_restaurant_pos.realtime.server import serve

	try:
		return serve(config)
	except ConfigError as exc:
		logging.getLogger("excel_restaurant_pos.realtime").error("%s", exc)
		return 2


def parse_args(argv: list[str]) -> argparse.Namespace:
	from excel_restaurant_pos.realtime.config import SETTINGS

	parser = argparse.ArgumentParser(
		prog="python -m excel_restaurant_pos.realtime",
		description="Bearer-token Socket.IO server for Excel Restaurant POS.",
		epilog="Commands: token, check, publish, listen, status (python -m excel_restaurant_pos.realtime COMMAND --help).",
	)
	parser.add_argument("--bench", help="bench folder (default: FRAPPE_BENCH_PATH, else found above the working directory)")
	parser.add_argument(
		"--dev",
		action="store_true",
		help="development: listen on 127.0.0.1 unless a host is given, a public secret if none is set, a local Redis if none answers, and a printed token",
	)
	for setting in SETTINGS:
		if setting.field == "jwt_secret_key":
			continue  # secrets stay out of the process list: config file or environment only
		flag = "--" + setting.field.replace("_", "-")
		source = f"config key {setting.key}" if setting.key else "config"
		env = f", env {setting.env}" if setting.env else ""
		parser.add_argument(flag, dest=setting.field, help=f"{setting.help} ({source}{env})")
	return parser.parse_args(argv)


if __name__ == "__main__":
	sys.exit(main())
