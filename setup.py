"""Build hook: ship the top-level ``recipes/`` and ``teachers/`` inside the package.

The folders stay at the repository's top level; when a wheel is built, ``build_py`` copies them into
``<build_lib>/kd_detr/_zoo/{recipes,teachers}/`` (never into the source tree), where
``kd_detr.zoo.builtin_dir`` finds them. An editable install copies nothing: ``kd_detr.zoo`` then
reads the checkout's folders. All metadata lives in ``pyproject.toml``; ``MANIFEST.in`` puts the
folders into the sdist so a wheel built from it carries them too.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# (source folder, patterns) -> kd_detr/_zoo/<folder>/
ZOO = {
    "recipes": ("*.toml", "README.md"),
    "teachers": ("*.toml", "README.md", "*.safetensors"),
}


def zoo_files() -> list[tuple[str, str]]:
    """``(source path, path relative to the package dir)`` of every file shipped in ``kd_detr/_zoo``."""
    out = []
    for kind, patterns in ZOO.items():
        for pattern in patterns:
            for src in sorted(glob.glob(os.path.join(HERE, kind, pattern))):
                if os.path.isfile(src):
                    out.append((src, os.path.join("_zoo", kind, os.path.basename(src))))
    return out


class build_py_with_zoo(build_py):
    """``build_py`` that also copies recipes and teacher cards into ``kd_detr/_zoo`` in build_lib."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: kd_detr.zoo falls back to the checkout's folders
        files = zoo_files()
        if not any(rel.startswith(os.path.join("_zoo", "recipes")) for _, rel in files):
            raise RuntimeError(f"no recipes found under {os.path.join(HERE, 'recipes')}: "
                               "the wheel would ship without them")
        zoo_dir = os.path.join(self.build_lib, "kd_detr", "_zoo")
        if os.path.isdir(zoo_dir):  # a reused build/ must not keep a recipe deleted since
            shutil.rmtree(zoo_dir)
        for src, rel in files:
            dst = os.path.join(self.build_lib, "kd_detr", rel)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [os.path.join(self.build_lib, "kd_detr", rel) for _, rel in zoo_files()]


setup(cmdclass={"build_py": build_py_with_zoo})
