"""The gateway's one YAML file, checked whole before anything starts.

Each section is a dataclass whose fields carry their bounds (control_plane/validation.py checks
them and names the failing key). A typo must stop the process with the key that is wrong, not
become a default silently, so unknown keys are errors too. The admin API checks its fields
with the same types.

fields.py: the shared field types; listen.py, routing.py, auth.py, backends.py, state.py,
observability.py, longform.py: the sections; gateway.py: the whole file; load.py: reading it and the checks across sections.
"""

from control_plane.config.auth import AuthConfig, PlanConfig, PlanName
from control_plane.config.backends import (AnyEngine, BackendConfig, DiscoveryConfig, EngineConfig, ModelConfig,
                                           SimulatedEngine, VllmEngine, WhisperCpuEngine)
from control_plane.config.fields import (MODEL_NAME_PATTERN, SECTION, YAML_OFF, Address, BackendUrl, Count, DrainTimeout,
                                         EnvName, FilePath, ModelName, Port, Positive, PositiveInt, RotationGrace, Weight,
                                         seconds)
from control_plane.config.gateway import GatewayConfig
from control_plane.config.listen import (BackendTlsConfig, InternalTlsConfig, LimitsConfig, ListenConfig, ListenTlsConfig,
                                         MetricsConfig, TimeoutsConfig)
from control_plane.config.longform import LongformConfig
from control_plane.config.load import DEFAULT_CONFIG_PATH, config_problems, load_config, parse_config
from control_plane.config.observability import ObservabilityConfig, TracingConfig
from control_plane.config.routing import ResilienceConfig, RoutingConfig
from control_plane.config.state import StateConfig
from control_plane.validation import ConfigError, check

__all__ = [
    "DEFAULT_CONFIG_PATH", "MODEL_NAME_PATTERN", "SECTION", "YAML_OFF",
    "Address", "AnyEngine", "AuthConfig", "BackendConfig", "BackendTlsConfig", "BackendUrl", "ConfigError", "Count",
    "DiscoveryConfig", "DrainTimeout", "EngineConfig", "EnvName", "FilePath", "GatewayConfig", "InternalTlsConfig", "LongformConfig",
    "LimitsConfig", "ListenConfig", "ListenTlsConfig", "MetricsConfig", "ModelConfig", "ModelName", "ObservabilityConfig", "PlanConfig",
    "PlanName", "Port", "Positive", "PositiveInt", "ResilienceConfig", "RotationGrace", "RoutingConfig",
    "SimulatedEngine", "StateConfig", "TimeoutsConfig", "TracingConfig", "VllmEngine", "Weight", "WhisperCpuEngine",
    "check", "config_problems", "load_config", "parse_config", "seconds",
]
