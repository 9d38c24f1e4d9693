"""What a strategy can be combined with, checked in one place before a run starts.

A strategy states what it needs with class flags (``needs_individual_updates``,
``needs_client_state``, ``needs_client_loss``, ``needs_plain_sgd``: fl_server/strategies/base.py),
and a driver states what it carries out itself (:data:`DRIVER_FEATURES`). The rules joining
them with the configuration live here and nowhere else, so a plug-in strategy is held to exactly
the rules the built-in ones are, and the simulation and the REST server refuse the same runs with
the same one-line messages. Rules that need only the configuration (a trim ratio too large for
the clients per round) stay with the schema (fl_common/config/schema.py), which must not import
the server.

Both coordinators call :func:`check_strategy_features` when they are built; a driver that wants
the refusal before it loads data or forks workers calls :func:`check_components` first (it loads
plug-ins, builds the strategy and the selection policy once, and applies the same rules).
"""

from __future__ import annotations

from collections.abc import Collection

from fl_common.config import ConfigError, FLConfig
from fl_server.selection.factory import build_selection
from fl_server.strategies.base import Strategy
from fl_server.strategies.factory import build_strategy, strategy_label

__all__ = ["DRIVER_FEATURES", "check_components", "check_strategy_features"]

#: What a driver may declare it carries out, beyond handing updates to the coordinator:
#: "control_variates" - keeps each client's SCAFFOLD variate between rounds and sends the server's
#: variate (``Coordinator.server_control``) with the model, returning ``ClientUpdate.control_delta``;
#: "attacks" - applies the simulated attacks of ``cfg.attack`` (fl_server/simulation/attacks.py);
#: "client_infos" - passes each candidate's reports (``infos=`` of ``plan_round``, ``ClientInfo``
#: candidates of ``AsyncCoordinator.dispatch``: records, label histogram, speeds), which every
#: selection policy but ``uniform`` draws on;
#: "secure_aggregation" - runs the clients' side of the SecAgg protocol (fl_server/secagg): it moves the
#: messages of ``Coordinator.secagg`` and submits masked updates only (``secagg_verifiers`` required);
#: "secagg_dropouts" - simulates the dropouts of ``cfg.secagg_dropout_rate`` (simulation only);
#: "ckks" - runs the CKKS rounds of ``secure_aggregation_method: ckks`` (fl_server/he: public key, ciphertexts,
#: decryption of the sum by the round's decryptor; ``Coordinator.ckks``).
DRIVER_FEATURES = ("control_variates", "attacks", "client_infos", "secure_aggregation", "secagg_dropouts", "ckks")

#: the strategies that combine with secure aggregation, named when one that does not is refused
_SUM_STRATEGIES = "fedavg/fedprox/fedavgm/fedadam/fedyogi/fedadagrad/scaffold"


def check_strategy_features(cfg: FLConfig, strategy: Strategy | type[Strategy],
                            driver_features: Collection[str] = ()) -> None:
    """Refuse, with a ConfigError naming the key, a run whose strategy cannot be combined with the
    configuration (secure aggregation, differential privacy, the local optimizer) or with the
    driver that would run it (``driver_features``, see :data:`DRIVER_FEATURES`)."""
    unknown = set(driver_features) - set(DRIVER_FEATURES)
    if unknown:
        raise ValueError(f"unknown driver features {sorted(unknown)}: allowed {', '.join(DRIVER_FEATURES)}")
    cls = strategy if isinstance(strategy, type) else type(strategy)
    label = strategy_label(cfg)
    if cfg.secure_aggregation and (cls.needs_individual_updates or cls.needs_client_loss):
        why = ("needs individual updates (it is a statistic of them, not of their sum)" if cls.needs_individual_updates
               else "weighs each update by its client's own loss")
        raise ConfigError(f"{label} {why}, but secure aggregation lets the server see only the sum: set secure_aggregation: "
                          f"false, or use {_SUM_STRATEGIES}")
    if cfg.differential_privacy and cls.needs_client_loss:
        raise ConfigError(f"{label} needs each client's training loss F_k sent in the clear, which differential privacy does "
                          f"not cover (it would leak a statistic of the private data): set differential_privacy: false, or "
                          f"use another aggregation_method")
    if cfg.differential_privacy and cfg.dp_mode == "client" and (cls.needs_individual_updates or cls.needs_client_state):
        why = ("needs individual updates, which client-level DP-FedAvg does not release" if cls.needs_individual_updates
               else "uploads a control-variate delta that client-level DP-FedAvg neither clips nor noises")
        raise ConfigError(f"{label} {why}: use dp_mode: sample, or fedavg/fedprox/fedavgm/fedadam/fedyogi/fedadagrad")
    if cls.needs_plain_sgd and (cfg.optimizer != "sgd" or cfg.momentum != 0.0):
        raise ConfigError(f"{label} needs plain local SGD (optimizer: sgd, momentum: 0), got optimizer {cfg.optimizer!r} with "
                          f"momentum {cfg.momentum:g}: its control variate (x - y_i) / (K lr) is the mean local gradient only "
                          f"for plain SGD steps (raise learning_rate instead of using momentum)")
    _check_driver_features(cfg, cls, label, driver_features)


def _check_driver_features(cfg: FLConfig, cls: type[Strategy], label: str, features: Collection[str]) -> None:
    if cls.needs_client_state and "control_variates" not in features:
        raise ConfigError(f"{label} needs clients that keep a control variate between rounds, which this driver does not "
                          f"carry yet (the simulation does): use another aggregation_method here, or run it with python -m "
                          f"fl_server simulate")
    if cfg.attack != "none" and "attacks" not in features:
        raise ConfigError(f"config key 'attack' has value {cfg.attack!r}: simulated attacks exist only in the simulation "
                          f"(python -m fl_server simulate); set attack: none")
    if cfg.secure_aggregation and cfg.secure_aggregation_method == "ckks" and "ckks" not in features:
        raise ConfigError("config key 'secure_aggregation_method' is 'ckks', but this driver does not run CKKS rounds yet "
                          "(the simulation does: python -m fl_server simulate); set secure_aggregation_method: masking")
    if cfg.secure_aggregation and cfg.secure_aggregation_method == "masking" and "secure_aggregation" not in features:
        raise ConfigError("config key 'secure_aggregation' is true, but this driver does not run the secure aggregation "
                          "protocol yet (the simulation does: python -m fl_server simulate); set secure_aggregation: false")
    if cfg.secagg_dropout_rate > 0 and "secagg_dropouts" not in features:
        raise ConfigError(f"config key 'secagg_dropout_rate' has value {cfg.secagg_dropout_rate:g}: simulated dropouts exist "
                          f"only in the simulation (python -m fl_server simulate); set secagg_dropout_rate: 0")
    if cfg.selection != "uniform" and "client_infos" not in features:
        raise ConfigError(f"selection '{cfg.selection}' draws on what each client reports (ClientInfo), which this driver "
                          f"does not pass yet (the simulation does): use selection: uniform here, or run it with "
                          f"python -m fl_server simulate")


def check_components(cfg: FLConfig, driver_features: Collection[str] = ()) -> None:
    """What a driver calls at start-up, before it loads data or forks workers: loads and builds the
    configured strategy and selection policy (plug-ins included, so a missing module, attribute or
    base class, or a constructor that refuses its keys, is a one-line ConfigError here) and applies
    :func:`check_strategy_features`. The coordinator builds its own instances later."""
    strategy = build_strategy(cfg)
    build_selection(cfg, model_bytes=0)
    check_strategy_features(cfg, strategy, driver_features)
