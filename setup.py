"""Package layout that pyproject.toml cannot express on its own (everything else is in pyproject.toml).

* ``optimum_vim_kernels`` lives in ``kernels/optimum_vim_kernels`` (no ``__init__.py`` directly in ``kernels/``, which
  would shadow Hugging Face's ``kernels`` package);
* the model-card templates live in ``model_cards/templates`` and ship as the data package ``optimum_vim.model_cards``.
"""

from setuptools import find_namespace_packages, setup

packages = (
    find_namespace_packages(".", include=["optimum_vim", "optimum_vim.*", "optimum.commands.register*"])
    + find_namespace_packages("kernels", include=["optimum_vim_kernels", "optimum_vim_kernels.*"])
    + ["optimum_vim.model_cards"]
)

setup(
    packages=packages,
    package_dir={
        "optimum_vim_kernels": "kernels/optimum_vim_kernels",
        "optimum_vim.model_cards": "model_cards/templates",
    },
)
