"""The shape of the code (issue 24): no import cycles, scale/ below pruning/, small files and functions, a
command line that imports no heavy library, and registries that pick up a new method or family from one place."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1] / "edgeprune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports() -> dict[str, set[str]]:
    """Module -> the edgeprune modules it imports when it is imported (module level, not inside functions)."""
    graph = {}
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeprune"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("edgeprune")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """A cycle of ``graph`` as a list of nodes, or None (depth-first search for a back edge)."""
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_no_import_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    cycle = find_cycle(top_level_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_scale_never_imports_pruning():
    for path in (PACKAGE / "scale").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("edgeprune.pruning"), f"{path.name} imports {node.module}"


def test_small_files_and_functions():
    long_files = [p.name for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert not long_files, f"files over 400 lines: {long_files}"
    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{module_name(path)}.{node.name}")
    assert not long_functions, f"functions over 60 lines: {long_functions}"


def test_the_top_level_holds_only_what_everything_shares():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__", "__main__", "cache", "errors", "guard", "targets"]


@pytest.mark.parametrize("module", ["edgeprune.cli", "edgeprune.runtime", "edgeprune.pruning.methods"])
def test_light_modules_import_no_heavy_library(module):
    code = (f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') "
            f"if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = ["onnxruntime"] if module == "edgeprune.runtime" else []
    assert json.loads(out.stdout.replace("'", '"')) == expected


def test_a_method_in_one_file_is_picked_up_by_the_registry_and_the_cli(tmp_path, tiny_original, cache):
    from edgeprune.cli import main
    from edgeprune.pruning import methods

    @dataclass(frozen=True)
    class Last(methods.MethodConfig):
        """A test method: the highest expert index wins."""

        name: ClassVar[str] = "test-last"
        needs_calibration: ClassVar[bool] = False

    @methods.register(Last)
    def score(cfg, model, stats, **_):
        import numpy as np

        return {i: np.arange(len(s.counts), dtype=float) for i, s in stats.items()}

    try:
        res = CliRunner().invoke(main, ["score", "--help"])
        assert "test-last" in res.output
        out = tmp_path / "plan.json"
        res = CliRunner().invoke(main, ["score", "--model", str(tiny_original), "--method", "test-last",
                                        "--experts", "1", "--calibration-examples", "16", "--out", str(out)])
        assert res.exit_code == 0, res.output
        plan = json.loads(out.read_text())
        assert plan["method"] == "test-last" and all(l["groups"] == [[[3, 1.0]]] for l in plan["layers"])
    finally:
        methods.METHODS.pop("test-last")


def test_a_method_option_of_another_method_is_refused():
    from edgeprune.errors import ConfigError
    from edgeprune.pruning import methods

    assert methods.cli_values("uncurl", {"seed": 3, "router_steps": 7, "pretrained": None}) == \
        {"seed": 3, "router_steps": 7}
    with pytest.raises(ConfigError, match="--router-steps is an option of uncurl, not of reap; drop it"):
        methods.cli_values("reap", {"seed": 0, "router_steps": 7})


def test_a_family_in_one_place_is_picked_up_by_the_registry_and_the_cli():
    from dataclasses import replace

    from edgeprune.cli import main
    from edgeprune.models import registry

    fake = replace(registry.adapter_for("mixtral"), model_type="mixtral-test")
    registry.register(fake)
    try:
        assert registry.adapter_for("mixtral-test") is fake
        from edgeprune.export.support import family_lines

        assert any(line.startswith("mixtral-test ") for line in family_lines())  # what `families` lists
        res = CliRunner().invoke(main, ["families"])
        assert res.exit_code == 0 and "mixtral " in res.output
    finally:
        registry.ADAPTERS.pop("mixtral-test")


def test_packages_depend_on_each_other_without_cycles():
    """Every import, in functions too, between the packages (cli, build, pruning, scale, ...) goes one way."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        pkg = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        graph.setdefault(pkg, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeprune."):
                dep = node.module.split(".")[1]
                if dep != pkg:
                    graph[pkg].add(dep)
                    graph.setdefault(dep, set())
    cycle = find_cycle(graph)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_the_known_execution_providers_are_onnxruntimes():
    import onnxruntime

    from edgeprune.targets import PROVIDERS

    assert set(onnxruntime.get_all_providers()) <= set(PROVIDERS)


@pytest.mark.parametrize("args", [["--help"], ["targets"], ["tasks"], ["families"], ["build", "--help"],
                                  ["score", "--method", "x"]])
def test_quick_commands_import_no_heavy_library(args):
    """``--help``, ``targets``, ``tasks`` and option errors answer without torch, transformers or onnxruntime
    (held by the import graph, not by a timer)."""
    code = ("import sys\nfrom edgeprune.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))" % args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_the_family_table_is_the_registrys():
    """``edgeprune families`` reads models/families.json, written from the adapters: it must say what they say."""
    from edgeprune.export.support import TABLE, family_lines

    assert json.loads(TABLE.read_text()) == family_lines(), (
        "models/families.json is stale: python -c \"from edgeprune.export.support import write_table; write_table()\"")
