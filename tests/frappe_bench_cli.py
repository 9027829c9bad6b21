"""What ``bench --site SITE …`` runs, for the apps' commands: Frappe's own discovery, as
``frappe/utils/bench_helper.py`` does it, without the rest of Frappe.

bench runs ``python -m frappe.utils.bench_helper frappe --site SITE COMMAND …`` from the
bench's ``sites`` folder. Frappe lists the installed apps in ``sites/apps.txt``, imports
``<app>.commands`` of each, puts every click command of its ``commands`` list under the
group ``frappe``, and that group's ``--site`` option leaves the sites in ``ctx.obj``: a dict
on v14 and v15, a ``CliCtxObj`` dataclass on newer Frappe (``FRAPPE_CTX=object`` here).

Usage: python frappe_bench_cli.py frappe [--site SITE] COMMAND …
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

import click


@dataclasses.dataclass
class CliCtxObj:
	sites: list[str]
	force: bool
	profile: bool
	verbose: bool


def get_sites(site_arg: str | None) -> list[str]:
	if site_arg == "all":
		return sorted(path.parent.name for path in Path(".").glob("*/site_config.json"))
	if site_arg:
		return [site_arg]
	if os.environ.get("FRAPPE_SITE"):
		return [os.environ["FRAPPE_SITE"]]
	default_site = json.loads(Path("common_site_config.json").read_text()).get("default_site")
	return [default_site] if default_site else []


def get_app_commands(app: str) -> dict[str, click.Command]:
	try:
		module = importlib.import_module(f"{app}.commands")
	except ModuleNotFoundError as exc:
		if exc.name == f"{app}.commands":
			return {}
		raise
	return {command.name: command for command in getattr(module, "commands", [])}


@click.option("--site")
@click.option("--profile", is_flag=True, default=False)
@click.option("--verbose", is_flag=True, default=False)
@click.option("--force", is_flag=True, default=False)
@click.pass_context
def app_group(ctx: click.Context, site: str | None = None, force: bool = False, verbose: bool = False, profile: bool = False) -> None:
	sites = get_sites(site)
	if os.environ.get("FRAPPE_CTX") == "object":
		ctx.obj = CliCtxObj(sites=sites, force=force, verbose=verbose, profile=profile)
	else:
		ctx.obj = {"sites": sites, "force": force, "verbose": verbose, "profile": profile}


def main() -> None:
	commands: dict[str, click.Command] = {}
	for app in Path("apps.txt").read_text().split():
		if app != "frappe":  # Frappe's own commands are not part of this stand-in
			commands.update(get_app_commands(app))
	groups = {"frappe": click.group(name="frappe", commands=commands)(app_group)}
	click.Group(commands=groups)(prog_name="bench")


if __name__ == "__main__":
	main()
