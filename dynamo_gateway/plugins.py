"""Building the plugin manager and the registry it fills.

There is no module-level plugin manager: `load_plugins()` builds one, adds the
hookspecs, registers the built-in defaults as ordinary plugins, loads the
``dynamo_gateway`` entry points (narrowed by ``DYNAMO_GATEWAY_PLUGINS``), checks
that every hookimpl matches a spec, and runs the registration hooks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from dynamo_gateway import hookspecs
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.registry import Family, Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dynamo_gateway"

# Built-in plugins, registered like any other (module path, plugin name).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("dynamo_gateway.default_plugins.engines", "builtin.engines"),
    ("dynamo_gateway.default_plugins.routers", "builtin.routers"),
    ("dynamo_gateway.default_plugins.runtime", "builtin.runtime"),
    ("dynamo_gateway.default_plugins.transports", "builtin.transports"),
    ("dynamo_gateway.default_plugins.tiers", "builtin.tiers"),
    ("dynamo_gateway.default_plugins.planner", "builtin.planner"),
    ("dynamo_gateway.default_plugins.parsers", "builtin.parsers"),
)

# hook name -> Registry attribute it fills
REGISTRATION_HOOKS: dict[str, str] = {
    "dynamo_gateway_register_engines": "engines",
    "dynamo_gateway_register_routers": "routers",
    "dynamo_gateway_register_kv_transports": "kv_transports",
    "dynamo_gateway_register_cache_tiers": "cache_tiers",
    "dynamo_gateway_register_discovery": "discovery",
    "dynamo_gateway_register_event_planes": "event_planes",
    "dynamo_gateway_register_planner_connectors": "planner_connectors",
    "dynamo_gateway_register_planner_policies": "planner_policies",
    "dynamo_gateway_register_tool_parsers": "tool_parsers",
    "dynamo_gateway_register_reasoning_parsers": "reasoning_parsers",
}


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, for `dynamo-gateway plugins`."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False


@dataclass
class Plugins:
    """The result of `load_plugins()`: the manager, the filled registry, and what loaded."""

    manager: pluggy.PluginManager
    registry: Registry
    loaded: list[PluginInfo] = field(default_factory=list)


def load_plugins(
    *,
    only: Sequence[str] | None = None,
    extra: Iterable[tuple[object, str]] = (),
    entry_points: bool = True,
    trace: bool = False,
) -> Plugins:
    """Build a plugin manager and registry.

    :param only: entry-point plugin names to load (``DYNAMO_GATEWAY_PLUGINS``);
        ``None`` loads all, an empty list none. Built-ins always load.
    :param extra: ``(plugin_object, name)`` pairs to register too (tests, embedding).
    :param entry_points: load installed ``dynamo_gateway`` entry points at all.
    :param trace: write every hook call to stderr (``DYNAMO_GATEWAY_TRACE_HOOKS``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if trace:
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    loaded: list[PluginInfo] = []

    for module_name, plugin_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=plugin_name)
        loaded.append(PluginInfo(plugin_name, module_name, builtin=True))

    if entry_points:
        loaded.extend(_load_entry_points(pm, only))

    for obj, name in extra:
        pm.register(obj, name=name)
        loaded.append(PluginInfo(name, getattr(obj, "__name__", type(obj).__name__)))

    pm.check_pending()
    registry = Registry()
    _run_registration_hooks(pm, registry, trace=trace)
    return Plugins(pm, registry, loaded)


def _load_entry_points(pm: pluggy.PluginManager, only: Sequence[str] | None) -> list[PluginInfo]:
    wanted = None if only is None else set(only)
    infos: list[PluginInfo] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # say which plugin broke, instead of a bare traceback
            raise ConfigError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}; "
                f"fix or uninstall it, or leave it out of DYNAMO_GATEWAY_PLUGINS"
            ) from exc
        pm.register(plugin, name=ep.name)
        dist = ep.dist
        infos.append(
            PluginInfo(
                ep.name,
                ep.value,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
        )
    if wanted:
        missing = wanted - {i.name for i in infos} - set(_registered_names(pm))
        if missing:
            raise ConfigError(
                f"DYNAMO_GATEWAY_PLUGINS names plugins that are not installed: "
                f"{', '.join(sorted(missing))}"
            )
    return infos


def _registered_names(pm: pluggy.PluginManager) -> list[str]:
    return [name for name, _ in pm.list_name_plugin() if name]


def _run_registration_hooks(pm: pluggy.PluginManager, registry: Registry, *, trace: bool) -> None:
    # Each implementation is called on its own so that the registry knows which
    # plugin registered what (for duplicate errors and `dynamo-gateway plugins`).
    for hook_name, attr in REGISTRATION_HOOKS.items():
        family: Family[Any] = getattr(registry, attr)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if trace:
                sys.stderr.write(f"{hook_name} -> {impl.plugin_name}\n")
            impl.function(register=_registrar(family, impl.plugin_name))


def _registrar(family: Family[Any], plugin: str) -> Callable[..., None]:
    def register(name: str, factory: Any, description: str = "") -> None:
        if not callable(factory):
            raise ConfigError(
                f"plugin {plugin!r} registered {family.kind} {name!r} "
                "with a factory that is not callable"
            )
        family.add(name, factory, plugin=plugin, description=description)

    return register


def import_optional(module: str, *, needed_by: str, hint: str) -> ModuleType:
    """Import an engine or transport library from inside a plugin's factory.

    Raises `ConfigError` that says what to install when the library is missing,
    or that it is broken when it is installed but fails to import.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or module == exc.name or module.startswith(f"{exc.name}."):
            raise ConfigError(f"{needed_by} needs {module}: {hint}") from None
        raise ConfigError(f"{module} is installed but cannot be imported ({exc}): {hint}") from exc
    except ImportError as exc:
        raise ConfigError(f"{module} is installed but cannot be imported ({exc}): {hint}") from exc
