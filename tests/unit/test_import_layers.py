"""The import graph keeps the layers of DESIGN.md: no cycles, no arrow pointing up.

Every import counts — module level, ``if TYPE_CHECKING:`` blocks and imports inside functions —
because each of them is a dependency a reader has to hold in mind, and a cycle closed with a
function-local import is still a cycle. The graph is read from the source with ``ast`` (nothing is
imported), so the test is fast and sees exactly what a reader sees.

Layers, from the top (a module may import its own layer and the ones below, never one above):

6. entry points and process-wide services: ``cli``, ``app``, ``wiring``, ``reload`` (policy hot
   reload), ``background`` (the tasks the server runs beside requests)
5. front ends: ``api/``
4. ``pipeline``: orders the steps
3. stages and the request-scoped types: ``exchange``, ``relay`` (the answer back to the client),
   ``routing/``, ``metering/``, ``reasoning/``, ``tools/``, ``transforms/``, ``translate/``, ``capture/``,
   ``responses/``, ``auth``, ``ratelimit``
2. what the stages stand on: ``upstreams/``, ``state/``, ``policy/``, ``storage/``
1. foundation: ``config`` (and ``config_state``), ``upstream_keys``, ``dburl``, ``redisurl``, ``yamlfile``,
   ``errors``, ``observability``, ``asgi``, ``data/``

The simulated upstream (the top-level ``simulator`` package) is reached from the gateway through
one adapter, ``gateway.upstreams.simulated``, and itself uses only the foundation.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "simulator")

LAYERS: dict[str, int] = {
    "gateway.cli": 6,
    "gateway.app": 6,
    "gateway.wiring": 6,
    "gateway.reload": 6,
    "gateway.background": 6,
    "gateway.drain": 6,
    "gateway.__main__": 6,
    "gateway.api": 5,
    "gateway.pipeline": 4,
    **dict.fromkeys(
        (
            "gateway.exchange",
            "gateway.relay",
            "gateway.access_log",
            "gateway.routing",
            "gateway.metering",
            "gateway.reasoning",
            "gateway.tools",
            "gateway.transforms",
            "gateway.translate",
            "gateway.capture",
            "gateway.responses",
            "gateway.auth",
            "gateway.ratelimit",
        ),
        3,
    ),
    **dict.fromkeys(("gateway.upstreams", "gateway.state", "gateway.policy", "gateway.storage"), 2),
    **dict.fromkeys(
        (
            "gateway",
            "gateway.config",
            "gateway.upstream_keys",
            "gateway.yamlfile",
            "gateway.errors",
            "gateway.observability",
        ),
        1,
    ),
    "gateway.asgi": 1,
    "gateway.dburl": 1,
    "gateway.redisurl": 1,
    "gateway.config_state": 1,
    "gateway.data": 1,
}
SIMULATOR_ADAPTER = "gateway.upstreams.simulated"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py") if (ROOT / package).is_dir() else ():
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:  # `from gateway.x import y`: y may be a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def layer(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_gateway_has_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles (every import counts, TYPE_CHECKING and function-local too):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_every_gateway_module_has_a_layer() -> None:
    missing = sorted(m for m in graph() if m.startswith("gateway") and layer(m) is None)
    assert not missing, f"modules without a layer in this test's LAYERS (add them where DESIGN.md puts them): {missing}"


def test_no_import_points_up_the_layers() -> None:
    upward = []
    for module, targets in graph().items():
        mine = layer(module)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_gateway_reaches_the_simulator_only_through_its_upstream_adapter() -> None:
    edges = graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        if module.startswith("gateway") and module != SIMULATOR_ADAPTER
        for target in targets
        if target == "simulator" or target.startswith(("simulator.", "gateway.simulator"))
    )
    assert not wrong, "only gateway.upstreams.simulated may import the simulator:\n" + "\n".join(wrong)


def test_the_simulator_uses_only_the_gateways_foundation() -> None:
    edges = graph()
    wrong = sorted(
        f"{module} imports {target} (layer {layer(target)})"
        for module, targets in edges.items()
        if module == "simulator" or module.startswith("simulator.")
        for target in targets
        if target.startswith("gateway") and (layer(target) or 0) > 1
    )
    assert not wrong, "the simulator may use gateway's foundation layer only:\n" + "\n".join(wrong)


def test_the_checker_sees_type_checking_and_function_local_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gateway.pipeline import chat\n"
        "def f():\n    import gateway.api.openai\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = imports("gateway.probe", path, {"gateway.pipeline", "gateway.api.openai", "gateway.api"})
    assert found == {"gateway.pipeline", "gateway.api.openai"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
