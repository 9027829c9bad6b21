"""``python -m excel_restaurant_pos.realtime``: start the realtime server.

Eventlet's monkey-patching happens here and only here, before anything else is imported,
so that importing the package elsewhere (Frappe, tests, scripts) changes nothing.
"""

import warnings

# Eventlet announces its maintenance mode on import; operators cannot act on that.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from excel_restaurant_pos.realtime.config import SETTINGS, ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
	parser = argparse.ArgumentParser(
		prog="python -m excel_restaurant_pos.realtime",
		description="Bearer-token Socket.IO server for Excel Restaurant POS.",
	)
	parser.add_argument("--bench", help="bench folder (default: FRAPPE_BENCH_PATH, else found above the working directory)")
	parser.add_argument("--dev", action="store_true", help="development: a public secret if none is set, a local Redis if none answers, and a printed token")
	for setting in SETTINGS:
		if setting.field == "jwt_secret_key":
			continue  # secrets stay out of the process list: config file or environment only
		flag = "--" + setting.field.replace("_", "-")
		source = f"config key {setting.key}" if setting.key else "config"
		env = f", env {setting.env}" if setting.env else ""
		parser.add_argument(flag, dest=setting.field, help=f"{setting.help} ({source}{env})")
	return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
	args = vars(parse_args(argv))
	bench, dev = args.pop("bench"), args.pop("dev")
	env = dict(os.environ)
	if dev:
		from excel_restaurant_pos.realtime import dev as development

		env.setdefault("EXCEL_RESTAURANT_POS_JWT_SECRET", development.DEV_SECRET)
	try:
		config = load_config(args, bench=bench, env=env)
		if dev:
			development.ensure_redis(config.redis_queue)
			print(development.banner(config), file=sys.stderr)
	except ConfigError as exc:
		print(f"excel_restaurant_pos realtime: configuration error: {exc}", file=sys.stderr)
		return 2
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


if __name__ == "__main__":
	sys.exit(main())
