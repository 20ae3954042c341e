"""The component registry that registration hooks fill.

The core owns it: plugins hand it named factories through ``register``
callables, it rejects duplicate names (naming both plugins) and answers
lookups with an error that lists what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from dynamo_gateway.engines.base import EngineFactory
from dynamo_gateway.errors import DuplicatePluginError, PluginNotFoundError
from dynamo_gateway.router.base import RouterFactory

if TYPE_CHECKING:
    from dynamo_gateway.disagg.transport import KvTransportFactory
    from dynamo_gateway.kvbm.tier import CacheTierFactory
    from dynamo_gateway.parsers.base import ReasoningParserFactory, ToolParserFactory
    from dynamo_gateway.planner.connector import ConnectorFactory
    from dynamo_gateway.planner.policy import PolicyFactory

F = TypeVar("F")
F_contra = TypeVar("F_contra", contravariant=True)

# Families whose interfaces land with later subsystems take any callable for now.
ComponentFactory = Callable[..., Any]


class Register(Protocol[F_contra]):
    """The ``register`` callable a registration hook receives."""

    def __call__(self, name: str, factory: F_contra, description: str = "") -> None: ...


EngineRegister = Register[EngineFactory]
RouterRegister = Register[RouterFactory]
KvTransportRegister = Register["KvTransportFactory"]
CacheTierRegister = Register["CacheTierFactory"]
DiscoveryRegister = Register[ComponentFactory]
EventPlaneRegister = Register[ComponentFactory]
PlannerConnectorRegister = Register["ConnectorFactory"]
PlannerPolicyRegister = Register["PolicyFactory"]
ToolParserRegister = Register["ToolParserFactory"]
ReasoningParserRegister = Register["ReasoningParserFactory"]


@dataclass(frozen=True)
class Registration(Generic[F]):
    name: str
    factory: F
    plugin: str
    description: str = ""


@dataclass
class Family(Generic[F]):
    """All registrations of one kind of component (engines, routers, ...)."""

    kind: str
    _items: dict[str, Registration[F]] = field(default_factory=dict)

    def add(self, name: str, factory: F, *, plugin: str, description: str = "") -> None:
        if not name or not isinstance(name, str):
            raise DuplicatePluginError(f"plugin {plugin!r} registered a {self.kind} with no name")
        if name in self._items:
            other = self._items[name].plugin
            raise DuplicatePluginError(
                f"{self.kind} {name!r} is registered by both plugin {other!r} and plugin "
                f"{plugin!r}; uninstall one, or narrow DYNAMO_GATEWAY_PLUGINS"
            )
        self._items[name] = Registration(name, factory, plugin, description)

    def get(self, name: str) -> F:
        try:
            return self._items[name].factory
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise PluginNotFoundError(
                f"no {self.kind} named {name!r} is registered (available: {known})"
            ) from None

    def registration(self, name: str) -> Registration[F]:
        self.get(name)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Registration[F]]:
        return iter(self._items.values())


@dataclass
class Registry:
    """Every registered component, by family."""

    engines: Family[EngineFactory] = field(default_factory=lambda: Family("engine"))
    routers: Family[RouterFactory] = field(default_factory=lambda: Family("router"))
    kv_transports: Family[KvTransportFactory] = field(
        default_factory=lambda: Family("KV transport")
    )
    cache_tiers: Family[CacheTierFactory] = field(default_factory=lambda: Family("cache tier"))
    discovery: Family[ComponentFactory] = field(default_factory=lambda: Family("discovery backend"))
    event_planes: Family[ComponentFactory] = field(
        default_factory=lambda: Family("event-plane backend")
    )
    planner_connectors: Family[ConnectorFactory] = field(
        default_factory=lambda: Family("planner connector")
    )
    planner_policies: Family[PolicyFactory] = field(
        default_factory=lambda: Family("planner policy")
    )
    tool_parsers: Family[ToolParserFactory] = field(default_factory=lambda: Family("tool parser"))
    reasoning_parsers: Family[ReasoningParserFactory] = field(
        default_factory=lambda: Family("reasoning parser")
    )

    def families(self) -> dict[str, Family[Any]]:
        return {
            "engines": self.engines,
            "routers": self.routers,
            "kv_transports": self.kv_transports,
            "cache_tiers": self.cache_tiers,
            "discovery": self.discovery,
            "event_planes": self.event_planes,
            "planner_connectors": self.planner_connectors,
            "planner_policies": self.planner_policies,
            "tool_parsers": self.tool_parsers,
            "reasoning_parsers": self.reasoning_parsers,
        }

    def provided_by(self, plugin: str) -> dict[str, list[str]]:
        """What one plugin registered, family -> names (families it left empty omitted)."""
        out: dict[str, list[str]] = {}
        for fam_name, fam in self.families().items():
            names = sorted(r.name for r in fam if r.plugin == plugin)
            if names:
                out[fam_name] = names
        return out
