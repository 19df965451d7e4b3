"""The shape of the code (CONTRIBUTING.md): private names stay private, stn uses invariance's public
API only, the import graph has no cycle, each concept has one home, and docs/api.md is current.

These read the source (``ast``), so each failure names the file and the line to change.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import invariance

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("invariance", "stn")
PUBLIC_SUBMODULES = {"invariance": {"geometry", "testing", "reference", "datasets", "toys", "checks", "files", "sweep"},
                     "stn": set()}


def _modules(pkg: str) -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / pkg).glob("*.py")):
        name = pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"
        out[name] = p
    return out


ALL = {**_modules("invariance"), **_modules("stn")}
CODE = {**ALL, **{f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")},
        **{f"scripts.{p.stem}": p for p in (ROOT / "scripts").glob("*.py")}}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    pkg = module if module in PACKAGES else module.rsplit(".", 1)[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def _imports(module: str, path: Path):
    """(line, imported module, imported names) of every import in the file (also inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            yield node.lineno, src, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


@pytest.mark.parametrize("module", sorted(CODE))
def test_no_private_name_is_imported_from_another_module(module):
    """``from X import _name`` across modules, and ``import``/``from`` of the other package's private
    modules, are not allowed outside the tests (a private name has one module that owns it)."""
    bad = []
    for line, src, names in _imports(module, CODE[module]):
        if src == "__future__":
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                bad.append(f"{CODE[module].name}:{line}: imports {n} from {src}")
        top = src.split(".")[0]
        own = module.split(".")[0]
        parts = src.split(".")
        if top in PACKAGES and top != own and len(parts) > 1 and parts[1].startswith("_"):
            bad.append(f"{CODE[module].name}:{line}: imports the private module {src}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(CODE))
def test_no_private_attribute_of_another_module_is_used(module):
    """``G._check_size(...)``-style access to another module's private names (by a module alias)."""
    path = CODE[module]
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            for a in node.names:
                if f"{src}.{a.name}" in ALL or a.name in PUBLIC_SUBMODULES.get(src, ()):
                    aliases.add(a.asname or a.name)
    bad = [f"{path.name}:{n.lineno}: {n.value.id}.{n.attr}" for n in ast.walk(tree)
           if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
           and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not bad, "\n".join(bad)


def test_stn_uses_only_the_public_api_of_invariance():
    """Every ``invariance`` import in ``stn`` is the package itself or a public submodule."""
    bad = []
    for module, path in _modules("stn").items():
        for line, src, names in _imports(module, path):
            parts = src.split(".")
            if parts[0] != "invariance":
                continue
            if len(parts) > 1 and parts[1] not in PUBLIC_SUBMODULES["invariance"]:
                bad.append(f"{path.name}:{line}: from {src}")
            if len(parts) == 1:
                bad += [f"{path.name}:{line}: {n} is not in invariance.__all__" for n in names
                        if n not in invariance.__all__]
    assert not bad, "\n".join(bad)


def test_invariance_never_imports_stn():
    bad = [f"{p.name}:{line}" for m, p in _modules("invariance").items()
           for line, src, _ in _imports(m, p) if src.split(".")[0] == "stn"]
    assert not bad, bad


def test_the_import_graph_has_no_cycle():
    """Static imports between the packages' modules (module level and inside functions) form a DAG.
    A package's ``__init__`` (which re-exports) counts only where a module imports the package."""
    graph: dict[str, set[str]] = {m: set() for m in ALL}
    for module, path in ALL.items():
        for _, src, names in _imports(module, path):
            subs = {f"{src}.{n}" for n in names} & set(ALL)
            targets = subs if names and len(subs) == len(names) else {src} | subs  # `from . import mod`
            graph[module] |= {t for t in targets if t in ALL and t != module}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, trail):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend(trail[trail.index(n):] + [n] if n in trail else [m, n])
                return True
            if state.get(n) is None and visit(n, trail + [n]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def _sources(pattern: str) -> list[str]:
    """Files of both packages whose code matches ``pattern``."""
    return sorted(p.relative_to(ROOT).as_posix() for p in ALL.values() if re.search(pattern, p.read_text()))


def test_each_concept_has_one_home():
    """The pixel-centre formula, the search presets, the MNIST CNN's layers and the transformation ->
    search-family table are each written once (CONTRIBUTING.md)."""
    assert _sources(r"\* 2 \+ 1\) / [hw]\b") == ["invariance/geometry.py"]
    assert _sources(r"SearchConfig\((?!\*\*)[^)]*(n_angles|refine_steps|top_k|log2_scales)\s*=") == []
    assert _sources(r'"refine_steps":') == ["invariance/_search.py"]  # the presets
    assert _sources(r"nn\.Conv2d\([^)]*,\s*9\b|\(64, 9\)") == ["invariance/_zoo.py"]
    assert _sources(r'"rotation":\s*"rigid"') == ["invariance/_measure.py"]
    assert _sources(r"def projective_grid|affine_grid\(") == ["invariance/_warp.py"]


def test_api_page_is_current():
    """docs/api.md is generated from the packages' ``__all__`` (``python scripts/api_page.py``)."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_page.py"), "--check"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr


def test_public_api_is_exactly_all():
    """Each public name resolves, and the package advertises nothing beyond ``__all__`` in its docs."""
    import stn

    for pkg in (invariance, stn):
        missing = [n for n in pkg.__all__ if not hasattr(pkg, n)]
        assert not missing, f"{pkg.__name__}: {missing}"
        assert len(set(pkg.__all__)) == len(pkg.__all__)


RECORD_READERS = [ROOT / "invariance" / "_report.py", ROOT / "invariance" / "_demo.py",
                  *sorted((ROOT / "stn").glob("*.py"))]
_SCHEMA1_KEYS = r"(?:(?:invariance|expected|spatial|permutation|linear|linear_fit)_error(?:_ci)?|best_params|" \
                r"channel_orbits|random_pair_null(?:_ci)?|interpolation_floor|per_image|excluded_reasons|" \
                r"permutation_agreement|linear_warning|region_size)"
_RECORD = r"\b(?:r|rec|record|records?\[[^\]]+\])"  # the names records go by in these modules
_BY_KEY = re.compile(_RECORD + r"""\s*(?:\[\s*|\.get\(\s*)["']""" + _SCHEMA1_KEYS + r"""["']""")


@pytest.mark.parametrize("path", RECORD_READERS, ids=lambda p: p.name)
def test_no_module_reads_a_record_by_string_key(path):
    """Records are typed (``invariance.LayerRecord``): the report, the demo and ``stn`` read their fields
    (``record.errors.spatial.mean``), never the deprecated schema-1 keys (``record["spatial_error"]``)."""
    bad = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
           if _BY_KEY.search(line)]
    assert not bad, "\n".join(bad)


def _test_map() -> dict[str, list[str]]:
    """``{module path: [test files]}`` from the first table of tests/README.md."""
    text = (ROOT / "tests" / "README.md").read_text()
    rows = re.findall(r"^\| `((?:invariance|stn)/[\w/]+\.py)` \| (.+) \|$", text, flags=re.M)
    return {mod: re.findall(r"`(test_\w+\.py)`", tests) for mod, tests in rows}


def test_every_module_has_its_test_modules_in_the_map():
    """tests/README.md maps each module of both packages to the test modules that test it: every
    module has a row, every file named exists, and every test module is named somewhere."""
    mapping = _test_map()
    modules = sorted(p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py"))
    assert sorted(mapping) == modules, sorted(set(modules) ^ set(mapping))
    missing = sorted({t for ts in mapping.values() for t in ts if not (ROOT / "tests" / t).is_file()})
    assert not missing, missing
    named = set(re.findall(r"`(test_\w+\.py)`", (ROOT / "tests" / "README.md").read_text()))
    unnamed = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in named)
    assert not unnamed, unnamed
