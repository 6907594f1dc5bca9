"""The Grafana dashboard charts only metrics the gateway really exports, through the provisioned datasource.

The exported names are computed from the gateway's own Prometheus registry
(``gateway.observability.REGISTRY``, the one ``GET /metrics`` serves), never from a list kept here:
renaming a metric in code without updating ``grafana/dashboards/kimi-gateway.json`` (or charting a
metric the gateway never registered) fails this test instead of leaving a blank panel in Grafana.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "kimi-gateway.json"
DATASOURCE_UID = "prometheus"

# Importing these registers every metric a running gateway exports: the observability module, and
# the app, which imports every part of the gateway that runs in the server (metering included), so a
# metric defined outside observability.py on the same registry is seen too.
METRIC_MODULES = ("gateway.observability", "gateway.app")

# Sample names a metric family of each type produces in the text exposition format.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "unknown": ("",),
}

# Grafana's built-in variables: defined by Grafana, not by the dashboard's templating.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}

# PromQL words that are not metric names and are not followed by "(" (functions and aggregations are
# recognised by the "(" that follows them, so they need no list).
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip

_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
# an identifier that is not part of a number (1e-9, 0.95, 5m) and not a function call
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_VARIABLE_QUERY = re.compile(r"^\s*(label_values|label_names|metrics|query_result)\s*\((.*)\)\s*$", re.DOTALL)
_VARIABLE_NAME = re.compile(r"\$\{(\w+)[^}]*\}|\$(\w+)|\[\[(\w+)[^\]]*\]\]")


def exported_sample_names() -> set[str]:
    """Every sample name ``GET /metrics`` can show, from the gateway's real registry."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    from gateway.observability import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)  # whatever a custom collector yields
    return names


def metric_names(promql: str) -> set[str]:
    """Metric names a PromQL expression selects (label names, functions, keywords and numbers excluded)."""
    text = _VARIABLE.sub("0", promql)  # $tenant, ${x:regex}, [[x]], $__rate_interval
    text = _STRING.sub('""', text)  # label values and label_replace arguments
    text = _MATCHERS.sub(" ", text)  # {label="value", ...}
    text = _RANGE.sub(" ", text)  # [5m], [1h:1m]
    text = _GROUPING.sub(" ", text)  # by (le, upstream), on (tenant), group_left (model)
    return {name for name in _IDENT.findall(text) if name.lower() not in PROMQL_KEYWORDS}


def variable_promql(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query ("" when it names no metric)."""
    match = _VARIABLE_QUERY.match(query)
    if match is None:
        return query  # a plain PromQL query
    function, args = match.groups()
    if function == "metrics":  # metrics(regex): a pattern, not a selector
        return ""
    if function in {"query_result", "label_names"}:
        return args
    # label_values(label) or label_values(selector, label): the label follows the last comma
    selector, comma, _label = args.rpartition(",")
    return selector if comma else ""


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including the ones a (collapsed) row keeps in its own ``panels``."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    queries: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                where = f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}"
                queries.append((where, target["expr"]))
    for variable in query_variables(dashboard):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query") or query.get("expr")
        for text in (query, variable.get("definition")):
            if isinstance(text, str) and text.strip():
                queries.append((f"variable ${variable.get('name')}", variable_promql(text)))
    return queries


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("promql", "expected"),
    [
        (
            'histogram_quantile(0.95, sum by (le, upstream) (rate(gateway_ttft_seconds_bucket{tenant=~"$tenant", '
            'upstream=~"($upstream)(/.*)?"}[$__rate_interval])))',
            {"gateway_ttft_seconds_bucket"},
        ),
        (
            'sum(rate(a_total{status=~"5.."}[5m])) by (tenant) / clamp_min(sum(rate(b_total[5m:1m] offset 1h)), 1e-9)',
            {"a_total", "b_total"},
        ),
        ("(sum(x) or vector(0)) / on (tenant) group_left (model) y > bool 0.5", {"x", "y"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
        ("min by (tenant, window) (gateway_budget_remaining_usd)", {"gateway_budget_remaining_usd"}),
        ("sum without(le)(increase(c_total[$__range]))", {"c_total"}),
        ("time() - Inf + NaN", set()),
        ("sum by (upstream) (rate(a_total[5m])) / scalar(sum(rate(a_total[5m])))", {"a_total"}),
        ('sum by (candidate) (increase(d_total{candidate=~"($upstream)(/.*)?"}[$__range])) > 0', {"d_total"}),
    ],
)
def test_metric_name_extraction(promql: str, expected: set[str]) -> None:
    assert metric_names(promql) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("label_values(gateway_requests_total, tenant)", {"gateway_requests_total"}),
        ('label_values(gateway_requests_total{tenant=~"$tenant", model=~"a,b"}, model)', {"gateway_requests_total"}),
        ("label_values(tenant)", set()),
        ("query_result(topk(5, sum by (tenant) (rate(gateway_spend_usd_total[1h]))))", {"gateway_spend_usd_total"}),
        ("metrics(gateway_.*)", set()),
    ],
)
def test_variable_query_extraction(query: str, expected: set[str]) -> None:
    assert metric_names(variable_promql(query)) == expected


def test_dashboard_is_valid_json_with_panels(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard, dict)
    assert dashboard.get("uid") and dashboard.get("title")
    assert isinstance(dashboard.get("schemaVersion"), int)
    assert [p for p in iter_panels(dashboard["panels"]) if p.get("type") != "row"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel.get("id") for panel in iter_panels(dashboard["panels"])]
    assert all(isinstance(i, int) for i in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate panel ids: {duplicates}"


def test_every_panel_and_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    wrong: list[str] = []
    for panel in iter_panels(dashboard["panels"]):
        if panel.get("type") == "row":
            continue
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if (panel.get("datasource") or {}).get("uid") != DATASOURCE_UID:
            wrong.append(f"{where}: datasource {panel.get('datasource')!r}")
        if not panel.get("targets"):
            wrong.append(f"{where}: no targets")
        for target in panel.get("targets") or []:
            if (target.get("datasource") or {}).get("uid") != DATASOURCE_UID:
                wrong.append(f"{where} target {target.get('refId')}: datasource {target.get('datasource')!r}")
    for variable in query_variables(dashboard):
        if (variable.get("datasource") or {}).get("uid") != DATASOURCE_UID:
            wrong.append(f"variable ${variable.get('name')}: datasource {variable.get('datasource')!r}")
    assert not wrong, "not on datasource uid " + repr(DATASOURCE_UID) + ":\n  " + "\n  ".join(wrong)


def test_every_query_variable_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])} | BUILTIN_VARIABLES
    undefined: list[str] = []
    for where, promql in dashboard_queries(dashboard):
        for match in _VARIABLE_NAME.finditer(promql):
            name = next(group for group in match.groups() if group)
            if not name.isdigit() and name not in defined:  # $1: a regex group reference
                undefined.append(f"{where}: ${name}")
    assert not undefined, "undefined dashboard variables:\n  " + "\n  ".join(undefined)


def test_every_query_selects_a_metric(dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    assert queries
    empty = [f"{where}: {promql}" for where, promql in queries if promql and not metric_names(promql)]
    assert not empty, "queries that select no metric:\n  " + "\n  ".join(empty)


def test_dashboard_metrics_are_exported_by_the_gateway(dashboard: dict[str, Any]) -> None:
    exported = exported_sample_names()
    missing: dict[str, list[str]] = {}
    for where, promql in dashboard_queries(dashboard):
        for name in metric_names(promql) - exported:
            missing.setdefault(name, []).append(where)
    report = "\n".join(
        f"  {name}  (used by {len(uses)} queries, e.g. {uses[0]})" for name, uses in sorted(missing.items())
    )
    assert not missing, (
        f"the dashboard uses {len(missing)} metric name(s) the gateway does not export:\n{report}\n"
        f"exported: {', '.join(sorted(exported))}"
    )


def test_every_gateway_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    """The reverse direction: a metric added to the gateway gets a panel, or operators never see it."""
    exported_families = {
        family.name + SUFFIXES.get(family.type, ("",))[0]
        for family in _gateway_families()
        if family.name.startswith("gateway_")
    }
    charted = {name for _, promql in dashboard_queries(dashboard) for name in metric_names(promql)}
    charted |= {name.removesuffix(suffix) + "_bucket" for name in charted for suffix in ("_sum", "_count")}
    uncharted = sorted(exported_families - charted)
    assert not uncharted, f"gateway metrics no panel charts (add one to {DASHBOARD.name}): {', '.join(uncharted)}"


def _gateway_families() -> list[Any]:
    exported_sample_names()  # imports every module that registers metrics
    from gateway.observability import REGISTRY

    return list(REGISTRY.collect())
