import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent
version = re.search(r'^__version__ = "([^"]+)"', (here / "excel_restaurant_pos" / "__init__.py").read_text(), re.M)[1]

#: Frappe installs these itself, at the versions it pins. bench installs apps with --upgrade
#: (uv then takes the newest version a range allows), so inside a bench they are left to
#: Frappe: any range of ours would move its pin. Everywhere else they are ours to install.
FRAPPE_PROVIDES = {"redis", "requests", "pyjwt", "click"}


def in_a_bench() -> bool:
	"""``bench get-app`` clones an app into ``<bench>/apps/<app>``."""
	return (here.parent.parent / "sites" / "common_site_config.json").is_file()


def read_requirements(name: str) -> list[str]:
	lines = [line.strip() for line in (here / name).read_text().splitlines()]
	return [line for line in lines if line and not line.startswith("#")]


def requirements() -> list[str]:
	wanted = read_requirements("requirements.txt")
	if in_a_bench():
		wanted = [line for line in wanted if re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower() not in FRAPPE_PROVIDES]
	return wanted


setup(
	name="excel_restaurant_pos",
	version=version,
	description="Restaurant POS for Frappe with a Bearer-token realtime push server",
	long_description=(here / "README.md").read_text(encoding="utf-8"),
	long_description_content_type="text/markdown",
	author="Excel Restaurant POS Contributors",
	license="MIT",
	python_requires=">=3.10",
	packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "benchmarks.*")),
	include_package_data=True,
	zip_safe=False,
	install_requires=requirements(),
	extras_require={"gevent": read_requirements("requirements-gevent.txt")},
)
