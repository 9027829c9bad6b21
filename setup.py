import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'^__version__ = "([^"]+)"', (here / "excel_restaurant_pos" / "__init__.py").read_text(), re.M)[1]
requirements = [
	line.strip()
	for line in (here / "requirements.txt").read_text().splitlines()
	if line.strip() and not line.startswith("#")
]

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
	install_requires=requirements,
)
