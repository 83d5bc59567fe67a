"""Layering you can check: who may import what (docs/architecture.md, "What may import what").

Every .py file under collectors/, tuners/, daemon/ and looptune/ is parsed with `ast`; each
import is classified by where it runs:

- "module": at import time (module level, class bodies, module-level try/if blocks);
- "lazy":   inside a function (runs only when the function is called);
- "typing": under `if TYPE_CHECKING:` (never runs; exempt from every rule).

`importlib.import_module("literal")` counts as an import of that name. Relative imports are
resolved through pyproject.toml's mapping (daemon/ is looptune.daemon, and so on); a
`from a.b import c` is checked as `a.b.c`, so a rule can allow one submodule (`looptune.daemon.config`)
of a package it forbids.

RULES below is the table: which files (globs; `*` crosses folders), what they may not import
(prefixes), when (always, or only at module level), the imports excepted and the files excluded.
Every file must fall under a rule, so a new file is classified on purpose.
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder in the repository -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"looptune": "looptune", "daemon": "looptune.daemon", "collectors": "looptune.collectors",
            "tuners": "looptune.tuners"}

TORCH = ("torch", "torchvision", "torchaudio", "torchdata")
# Training frameworks the adapters plug into: user side only, like torch.
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")
# Framework adapters (`from looptune.lightning import LooptuneCallback`): imported only by a training
# script that has the framework, so they import it, and torch, at module level.
ADAPTER_FILES = ("looptune/lightning.py", "looptune/transformers.py")
# The hook side: the user's training process. The hook package (tuners/hook.py today,
# tuners/hook/ with its actuators/ once split) and the DataLoader actuator (tuners/loader.py,
# moving to tuners/hook/actuators/).
HOOK_SIDE = ("looptune.tuners.hook", "looptune.tuners.loader", "looptune.tuners.actuators",
             "looptune.lightning", "looptune.transformers")
HOOK_FILES = ("tuners/hook.py", "tuners/hook/*", "tuners/loader.py", "tuners/actuators/*")
# Training frameworks: only their adapters (looptune/lightning.py, looptune/transformers.py) use them.
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")
ADAPTER_FILES = ("looptune/lightning.py", "looptune/transformers.py")
# Installed, only `looptune` is ours at the top of site-packages: `daemon` there is python-daemon.
BARE = ("daemon", "collectors", "tuners")
OURS = ("looptune.daemon", "looptune.tuners", "looptune.collectors")


@dataclass(frozen=True)
class Rule:
    name: str
    files: tuple[str, ...]            # globs relative to the repository root (`*` crosses `/`)
    forbidden: tuple[str, ...]        # module prefixes
    when: str = "always"              # "always" (module level and lazy) or "module" (module level only)
    allowed: tuple[str, ...] = ()     # prefixes excepted from `forbidden`
    exclude: tuple[str, ...] = ()     # globs of files that `files` matches but this rule does not judge


RULES: tuple[Rule, ...] = (
    # Entry points: `import looptune` loads no torch and no daemon code (Hook is loaded on first
    # use); `python -m looptune` is the CLI.
    Rule("package root imports nothing heavy at import time", ("looptune/__init__.py",),
         TORCH + FRAMEWORKS + OURS, when="module"),
    Rule("python -m looptune runs the CLI only", ("looptune/__main__.py",), TORCH + FRAMEWORKS + BARE),
    # Shared modules at the root (protocol, schema, verdicts, promql, report): every side reads
    # them, so they read none of the sides.
    Rule("shared root modules import no package of looptune", ("looptune/*.py",), TORCH + FRAMEWORKS + OURS + BARE,
         exclude=("looptune/__init__.py", "looptune/__main__.py") + ADAPTER_FILES),
    # Framework adapters are hook side: the hook and the tuners it runs embedded, the config
    # dataclasses, torch and their framework; nothing else of the daemon, no collector directly.
    Rule("framework adapters: of the daemon, only its config", ADAPTER_FILES,
         ("looptune.daemon", "looptune.collectors") + BARE, allowed=("looptune.daemon.config",)),
    # Collectors sample and expose; they never run torch or a tuner.
    Rule("collectors import neither torch, the tuners nor the daemon", ("collectors/*",),
         TORCH + FRAMEWORKS + ("looptune.tuners", "looptune.daemon") + BARE),
    # The hook is the user side: torch only inside functions (importing the hook must work
    # without torch); it may read the config module (the dataclasses a Hook(config=...) takes,
    # the default socket paths), and run collectors and the engine in-process (embedded mode),
    # but nothing else of the daemon.
    Rule("hook and actuators: torch only lazily", HOOK_FILES, TORCH + FRAMEWORKS, when="module"),
    Rule("hook and actuators: of the daemon, only its config", HOOK_FILES, ("looptune.daemon",) + BARE,
         allowed=("looptune.daemon.config",)),
    # Policies: observations in, proposals out. No torch, no daemon, no hook.
    Rule("tuner policies import neither torch, the daemon nor the hook", ("tuners/*",),
         TORCH + FRAMEWORKS + ("looptune.daemon",) + HOOK_SIDE + BARE, exclude=HOOK_FILES),
    # `looptune demo` runs a training loop with the hook next to an in-process daemon: hook side.
    Rule("the demo is hook side: torch only lazily", ("daemon/demo.py",), TORCH + FRAMEWORKS + BARE,
         when="module"),
    # The daemon never imports torch or a training framework, not even lazily, nor the hook side
    # (the adapters included) that uses them.
    Rule("daemon imports neither torch nor the hook side", ("daemon/*",),
         TORCH + FRAMEWORKS + HOOK_SIDE + ("looptune.lightning", "looptune.transformers") + BARE,
         exclude=("daemon/demo.py",)),
)


@dataclass(frozen=True)
class Import:
    line: int
    name: str        # dotted, absolute
    kind: str        # "module", "lazy" or "typing"


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    name: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.name} ({self.rule})"


def module_name(rel: str) -> str:
    """`daemon/config.py` -> `looptune.daemon.config`; `tuners/hook/__init__.py` -> `looptune.tuners.hook`."""
    parts = rel[:-3].split("/")
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in `source` (the text of `module`), absolute, with where it runs."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def resolve(level: int, target: str | None) -> str:
        if level == 0:
            return target or ""
        base = package.split(".")
        base = base[:len(base) - (level - 1)] if level > 1 else base
        return ".".join([*base, *([target] if target else [])])

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, a.name, kind) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module)
            found.extend(Import(node.lineno, base if a.name == "*" else f"{base}.{a.name}", kind)
                         for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module") or
                    (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            found.append(Import(node.lineno, node.args[0].value, kind))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, kind)
            return
        inner = "lazy" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and \
            kind == "module" else kind
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), "module")
    return found


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _glob(rel: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, g) for g in globs)


def rules_for(rel: str) -> list[Rule]:
    """The rules that judge one file (`rel`, its path from the repository root)."""
    return [r for r in RULES if _glob(rel, r.files) and not _glob(rel, r.exclude)]


def check_source(rel: str, source: str) -> list[Violation]:
    """The violations in one file's text, `rel` its path from the repository root."""
    found = imports(source, module_name(rel), is_package=rel.endswith("/__init__.py"))
    out = []
    for rule in rules_for(rel):
        for imp in found:
            if imp.kind == "typing" or (rule.when == "module" and imp.kind != "module"):
                continue
            if _matches(imp.name, rule.forbidden) and not _matches(imp.name, rule.allowed):
                out.append(Violation(rel, imp.line, imp.name, rule.name))
    return out


def python_files(root: Path = ROOT) -> Iterator[str]:
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path.relative_to(root).as_posix()


def check_tree(root: Path = ROOT) -> list[Violation]:
    return [v for rel in python_files(root) for v in check_source(rel, (root / rel).read_text(encoding="utf-8"))]


# ---- the checks ----

def test_every_file_falls_under_a_rule() -> None:
    unclassified = [rel for rel in python_files() if not rules_for(rel)]
    assert not unclassified, f"add these files to a rule in RULES: {unclassified}"


def test_layering() -> None:
    violations = check_tree()
    for v in violations:
        print(v)
    assert not violations, "forbidden imports:\n" + "\n".join(map(str, violations))


# ---- the checker can fail ----

def _names(rel: str, source: str) -> list[str]:
    return [str(v) for v in check_source(rel, source)]


@pytest.mark.parametrize(("rel", "source", "expected"), [
    ("collectors/new.py", "import torch\n",
     "collectors/new.py:1 imports torch (collectors import neither torch, the tuners nor the daemon)"),
    ("collectors/new.py", "def f():\n    from looptune.tuners.engine import Engine\n",
     "collectors/new.py:2 imports looptune.tuners.engine.Engine (collectors import neither torch, the tuners "
     "nor the daemon)"),
    ("collectors/new.py", "from ..tuners import workers\n",
     "collectors/new.py:1 imports looptune.tuners.workers (collectors import neither torch, the tuners nor the "
     "daemon)"),
    ("tuners/workers.py", "def f():\n    import torch.nn\n",
     "tuners/workers.py:2 imports torch.nn (tuner policies import neither torch, the daemon nor the hook)"),
    ("tuners/engine.py", "from looptune.daemon import config\n",
     "tuners/engine.py:1 imports looptune.daemon.config (tuner policies import neither torch, the daemon nor "
     "the hook)"),
    ("tuners/hook/api.py", "import torch\n",
     "tuners/hook/api.py:1 imports torch (hook and actuators: torch only lazily)"),
    ("tuners/hook/actuators/loader.py", "try:\n    from torch.utils.data import DataLoader\nexcept ImportError:\n"
     "    pass\n",
     "tuners/hook/actuators/loader.py:2 imports torch.utils.data.DataLoader (hook and actuators: torch only "
     "lazily)"),
    ("tuners/hook/api.py", "def f():\n    from looptune.daemon.service import Daemon\n",
     "tuners/hook/api.py:2 imports looptune.daemon.service.Daemon (hook and actuators: of the daemon, only its "
     "config)"),
    ("daemon/service.py", "def f():\n    import importlib\n    importlib.import_module('torch')\n",
     "daemon/service.py:3 imports torch (daemon imports neither torch nor the hook side)"),
    ("daemon/status.py", "from looptune.tuners.hook import Hook\n",
     "daemon/status.py:1 imports looptune.tuners.hook.Hook (daemon imports neither torch nor the hook side)"),
    ("daemon/demo.py", "import torch\n",
     "daemon/demo.py:1 imports torch (the demo is hook side: torch only lazily)"),
    ("looptune/schema.py", "def f():\n    from looptune.collectors import base\n",
     "looptune/schema.py:2 imports looptune.collectors.base (shared root modules import no package of "
     "looptune)"),
    ("looptune/__init__.py", "from looptune.tuners.hook import Hook\n",
     "looptune/__init__.py:1 imports looptune.tuners.hook.Hook (package root imports nothing heavy at import "
     "time)"),
    ("daemon/cli.py", "from daemon import config\n",
     "daemon/cli.py:1 imports daemon.config (daemon imports neither torch nor the hook side)"),
    ("daemon/status.py", "def f():\n    import lightning.pytorch\n",
     "daemon/status.py:2 imports lightning.pytorch (daemon imports neither torch nor the hook side)"),
    ("daemon/service.py", "def f():\n    from transformers import Trainer\n",
     "daemon/service.py:2 imports transformers.Trainer (daemon imports neither torch nor the hook side)"),
    ("daemon/status.py", "from looptune.lightning import LooptuneCallback\n",
     "daemon/status.py:1 imports looptune.lightning.LooptuneCallback (daemon imports neither torch nor the hook "
     "side)"),
    ("looptune/lightning.py", "def f():\n    from looptune.daemon.service import Daemon\n",
     "looptune/lightning.py:2 imports looptune.daemon.service.Daemon (framework adapters: of the daemon, only its "
     "config)"),
    ("looptune/schema.py", "import lightning\n",
     "looptune/schema.py:1 imports lightning (shared root modules import no package of looptune)"),
    ("tuners/hook/api.py", "import lightning.pytorch\n",
     "tuners/hook/api.py:1 imports lightning.pytorch (hook and actuators: torch only lazily)"),
    ("daemon/service.py", "def f():\n    import transformers\n",
     "daemon/service.py:2 imports transformers (daemon imports neither torch nor the hook side)"),
    ("daemon/status.py", "from looptune.transformers import LooptuneCallback\n",
     "daemon/status.py:1 imports looptune.transformers.LooptuneCallback (daemon imports neither torch nor the "
     "hook side)"),
    ("looptune/schema.py", "import transformers\n",
     "looptune/schema.py:1 imports transformers (shared root modules import no package of looptune)"),
    ("looptune/transformers.py", "from looptune.daemon.service import Daemon\n",
     "looptune/transformers.py:1 imports looptune.daemon.service.Daemon (framework adapters: of the daemon, "
     "only its config)"),
])
def test_a_forbidden_import_is_reported(rel: str, source: str, expected: str) -> None:
    assert _names(rel, source) == [expected]


@pytest.mark.parametrize(("rel", "source"), [
    ("tuners/hook/api.py", "def f():\n    import torch\n"),                    # lazily, on the hook side
    ("tuners/loader.py", "def f():\n    import torch\n"),
    ("tuners/hook.py", "def f():\n    from looptune.daemon import config as cfg\n"),
    ("tuners/hook/api.py", "from looptune.daemon.config import Config\n"),
    ("daemon/demo.py", "def run():\n    import torch\n    from looptune.tuners.hook import Hook\n"),
    ("tuners/engine.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"),
    ("collectors/hookjobs.py", "from looptune.protocol import STEP_BUCKETS\nfrom looptune.schema import FIGURES\n"),
    ("daemon/service.py", "from looptune.tuners import engine\nfrom looptune.collectors.gpu import GpuCollector\n"),
    ("looptune/__init__.py", "def __getattr__(name):\n    from looptune.tuners.hook import Hook\n"),
    ("looptune/lightning.py", "import torch\nimport lightning.pytorch as pl\nfrom looptune.tuners.hook import Hook\n"
     "from looptune.daemon.config import Config\n"),
    ("looptune/transformers.py", "import transformers\nfrom looptune.tuners.hook.actuators.loader import derive\n"),
    ("looptune/transformers.py", "import torch\nimport transformers\nfrom looptune.tuners.hook import Hook\n"),
])
def test_an_allowed_import_is_not_reported(rel: str, source: str) -> None:
    assert _names(rel, source) == []


def test_a_file_on_disk_is_reported(tmp_path: Path) -> None:
    """The whole path: a tree on disk with one bad file, walked and parsed like the repository."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "collectors" / "ok.py").write_text("import psutil\n")
    (tmp_path / "daemon" / "bad.py").write_text('"""doc"""\nimport os\n\n\ndef f():\n    import torch\n')
    assert [str(v) for v in check_tree(tmp_path)] == \
        ["daemon/bad.py:6 imports torch (daemon imports neither torch nor the hook side)"]
