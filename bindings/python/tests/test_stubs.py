"""The type stubs (`_kvferry.pyi`) against the extension module they describe: the same names, the
same members, the same parameters, in the same kinds (positional or keyword-only, with a default or
without). A function added, renamed or given another signature in Rust fails here until the stubs
say so too."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import kvferry._kvferry as native

STUBS = pathlib.Path(__file__).resolve().parents[1] / "python" / "kvferry" / "_kvferry.pyi"
# Dunders a stub may declare and the module must then have; others (`__init__`, `__new__`, `__repr__`
# and the rest every class has) are not members of the API.
API_DUNDERS = {"__enter__", "__exit__", "__iter__", "__next__", "__len__", "__contains__", "__getitem__"}
# What a build without an optional feature lacks: the feature's classes, and its methods, which
# then take any arguments and raise Unsupported.
OPTIONAL = {"kv-events": ({"KvEventPublisher"}, {"TierStore.publish_events"})}


def missing_feature(name: str) -> str | None:
    """The optional feature that `name` (a class, or `Class.method`) belongs to, if this build lacks it."""
    for feature, (classes, methods) in OPTIONAL.items():
        if name in classes | methods and not all(hasattr(native, c) for c in classes):
            return feature
    return None


def stub_tree() -> ast.Module:
    return ast.parse(STUBS.read_text(), filename=str(STUBS))


def is_typed_dict(node: ast.ClassDef) -> bool:
    return any(isinstance(b, ast.Name) and b.id == "TypedDict" for b in node.bases)


def stub_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def stub_members(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> dict[str, ast.FunctionDef | None]:
    """A stub class's methods and properties (an alias, `write = read`, is the method it names; an
    attribute has no signature: None), with those of the stub-only bases (`_Closes`) it names,
    which the module's classes define themselves."""
    members: dict[str, ast.FunctionDef | None] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            members.update(stub_members(classes[base.id], classes))
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            members[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = None
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    members[target.id] = members.get(node.value.id)
    return members


def public(name: str) -> bool:
    return not name.startswith("_") or name in API_DUNDERS


def stub_parameters(func: ast.FunctionDef, *, bound: bool) -> list[tuple[str, str, bool]]:
    """(name, kind, has a default) of each parameter; `self` dropped from a method. `*args` and
    `**kwargs` are named by their kind alone: no caller can pass them by name."""
    args = func.args
    positional = args.posonlyargs + args.args
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    params = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    if bound and params:
        params = params[1:]
    if args.vararg:
        params.append(("*", "*args", False))
    params += [(a.arg, "keyword", d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append(("**", "**kwargs", False))
    return params


KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def runtime_parameters(obj: object, *, bound: bool) -> list[tuple[str, str, bool]]:
    params = list(inspect.signature(obj).parameters.values())
    if bound and params and params[0].name in ("self", "cls", "$self"):
        params = params[1:]
    named = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [(named.get(p.kind, p.name), KINDS[p.kind], p.default is not inspect.Parameter.empty) for p in params]


def test_the_stubs_name_every_public_name_of_the_module_and_no_other():
    tree = stub_tree()
    stubbed = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and public(node.name):
            if not (isinstance(node, ast.ClassDef) and is_typed_dict(node)):
                stubbed.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stubbed.add(node.target.id)
    present = {n for n in dir(native) if public(n)} | ({"__version__"} if hasattr(native, "__version__") else set())
    absent = {name for name in stubbed - present if missing_feature(name)}
    assert stubbed - present - absent == set(), "stubbed but not in the module"
    assert present - stubbed == set(), "in the module but not in the stubs"


def classes_and_members():
    tree = stub_tree()
    classes = stub_classes(tree)
    for name, cls in classes.items():
        if public(name) and not is_typed_dict(cls):
            yield name, cls, stub_members(cls, classes)


@pytest.mark.parametrize("name", [name for name, _, _ in classes_and_members()])
def test_each_class_has_the_members_its_stub_names_and_no_other(name):
    _, _, members = next(c for c in classes_and_members() if c[0] == name)
    runtime = getattr(native, name, None)
    if runtime is None and missing_feature(name):
        pytest.skip(f"this build has no {missing_feature(name)} feature, so no {name}")
    stubbed = {m for m in members if public(m)}
    present = {m for m in vars(runtime) if public(m)}
    assert stubbed - present == set(), f"{name}: stubbed but not in the class"
    assert present - stubbed == set(), f"{name}: in the class but not in the stubs"


def callables():
    """(label, stub function, runtime object, bound): every function, constructor and method with a
    signature to compare (properties have none)."""
    tree = stub_tree()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and public(node.name):
            yield node.name, node, getattr(native, node.name), False
    for name, _, members in classes_and_members():
        runtime = getattr(native, name, None)
        for member, func in members.items():
            # What the module lacks is the member test's to report.
            if runtime is None or not hasattr(runtime, member):
                continue
            if func is None or any(isinstance(d, ast.Name) and d.id == "property" for d in func.decorator_list):
                continue
            if member == "__init__":
                yield f"{name}()", func, runtime, True
            elif public(member):
                static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in func.decorator_list)
                yield f"{name}.{member}", func, getattr(runtime, member), not static


@pytest.mark.parametrize("label", [label for label, _, _, _ in callables()])
def test_each_signature_matches_its_stub(label):
    _, func, runtime, bound = next(c for c in callables() if c[0] == label)
    stub = stub_parameters(func, bound=bound)
    # A constructor's signature is the class's own (PyO3 gives it `__new__`'s, without `self`).
    got = runtime_parameters(runtime, bound=bound and not inspect.isclass(runtime))
    if missing_feature(label) and got == [("*", "*args", False), ("**", "**kwargs", False)]:
        pytest.skip(f"this build has no {missing_feature(label)} feature: {label} refuses every call")
    assert got == stub, f"{label}: the module takes {got}, the stub says {stub}"
