"""Package layout: the model in src/bmojo, the kernels beside it in backends/<name> (installed as bmojo_<name>)."""
from setuptools import find_packages, setup

BACKENDS = ("cuda", "neuron")
packages = find_packages("src") + [
    f"bmojo_{pkg}" for pkg in find_packages("backends") if pkg.split(".")[0] in BACKENDS
]
package_dir = {"": "src", **{f"bmojo_{name}": f"backends/{name}" for name in BACKENDS}}
setup(packages=packages, package_dir=package_dir)
