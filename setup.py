"""Package layout: the model and the op API in src/bmojo; the kernels in backends/<name>, installed as
bmojo.backends.<name> (the repository's backends/ folder is the bmojo.backends package). The torch backend
ships with the core package; the cuda backend needs Triton (the [cuda] extra) when imported, the neuron
backend needs the Neuron SDK's nki only when a kernel runs."""
from setuptools import find_packages, setup

packages = find_packages("src") + ["bmojo.backends"] + [f"bmojo.backends.{pkg}" for pkg in find_packages("backends")]
package_dir = {"": "src", "bmojo.backends": "backends"}
setup(packages=packages, package_dir=package_dir)
