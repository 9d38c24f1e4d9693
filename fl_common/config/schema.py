"""The configuration schema: every key, its type, default and allowed values, in one place.

The seed's parameter names, defaults and ranges are kept as they are, with two deliberate
widenings, both documented on the field: ``num_clients`` and ``num_rounds`` accept values below
the seed's lower bounds (10), because smoke runs, tests, resumable benchmark slices and a
three-client docker test need them and nothing about the algorithms requires 10.

Validation happens once, when a config is built (from YAML, a dict or ``--set``), so that a bad
value is refused before any data is loaded or any process is started.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line meant for the user."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[Any, ...] | None = None, help: str = "", lo_open: bool = False) -> Any:
    """A dataclass field carrying its own validation rules in ``metadata``."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "help": help, "lo_open": lo_open})


#: Aggregation strategies the server can run. Kept here (not imported from fl_server) because
#: fl_common must not import the server; a test checks this list equals the strategy registry.
AGGREGATION_METHODS = ("fedavg", "fedprox")
DATA_DISTRIBUTIONS = ("iid", "non-iid", "dirichlet", "shards")
DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODEL_TYPES = ("cnn", "mlp", "resnet", "custom")
OPTIMIZERS = ("sgd", "adam", "adagrad")
LR_SCHEDULES = ("constant", "step", "exponential", "cosine")
SELECTION_POLICIES = ("uniform",)
DP_MODES = ("sample", "client")
DP_ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class FLConfig:
    """One federated run. Field names follow the seed document where it names them."""

    # --- federation (seed names) ---
    num_clients: int = _opt(100, lo=1, hi=10000, help="clients in the federation (seed: 10-10000; values below 10 allowed for tests)")
    num_rounds: int = _opt(100, lo=1, hi=1000, help="federated rounds (seed: 10-1000; values below 10 allowed for tests)")
    local_epochs: int = _opt(5, lo=1, hi=20, help="local epochs per round")
    batch_size: int = _opt(32, lo=8, hi=512, help="local batch size")
    learning_rate: float = _opt(0.01, lo=1e-5, hi=1.0, help="client learning rate")
    aggregation_method: str = _opt("fedavg", choices=AGGREGATION_METHODS, help="server aggregation strategy")
    client_selection_ratio: float = _opt(0.1, lo=0.01, hi=1.0, help="fraction of clients selected per round")
    evaluation_frequency: int = _opt(1, lo=1, hi=1000, help="evaluate the global model every N rounds (and after the last)")

    # --- privacy and security (seed names; the seed turns DP and secure aggregation on) ---
    differential_privacy: bool = _opt(True, help="differential privacy on client updates")
    dp_epsilon: float = _opt(1.0, lo=0.1, hi=10.0, help="privacy budget epsilon for the whole run")
    dp_delta: float = _opt(1e-5, lo=1e-6, hi=1e-4, help="privacy budget delta for the whole run")
    secure_aggregation: bool = _opt(True, help="secure aggregation (the server sees only the sum)")
    clip_grad_norm: float = _opt(1.0, lo=0.1, hi=5.0, help="L2 clipping norm for DP sensitivity")
    # Differential privacy (see fl_server/privacy_engine.py). Sample-level DP-SGD is the default: it
    # protects each training record, the guarantee the seed's "epsilon = 1 costs 3.1 points" refers to;
    # client-level DP-FedAvg protects a client's whole dataset but needs far more clients than 100 per
    # run to leave a usable model (the noise on the sum does not shrink with the cohort's data).
    dp_mode: str = _opt("sample", choices=DP_MODES, help="'sample': DP-SGD on each client (record-level); 'client': DP-FedAvg (client-level)")
    dp_accountant: str = _opt("prv", choices=DP_ACCOUNTANTS, help="privacy accountant: 'prv' (tight, Opacus' default) or 'rdp'")
    dp_noise_multiplier: Optional[float] = _opt(None, lo=0.0, hi=1000.0, lo_open=True, help="noise multiplier override (default: calibrated from dp_epsilon, dp_delta, num_rounds)")
    dp_client_rounds: Optional[int] = _opt(None, lo=1, hi=1000, help="sample level: rounds per client the noise is calibrated for (default: expected, ceil(num_rounds x selection ratio))")
    dp_noise: str = _opt("central", choices=("central", "distributed"), help="client level: the server adds the noise, or each client adds its share")
    dp_adaptive_clipping: bool = _opt(False, help="client level: clip norm follows a quantile of update norms (Andrew et al. 2021)")
    dp_target_quantile: float = _opt(0.5, lo=0.0, hi=1.0, help="client level: target fraction of unclipped updates for adaptive clipping")

    # --- data (seed names) ---
    dataset: str = _opt("fashion_mnist", choices=DATASET_NAMES, help="dataset")
    data_dir: Optional[str] = _opt(None, help="folder with the dataset files (default: Debian's /usr/share/datasets/...)")
    download: bool = _opt(False, help="allow torchvision to download a missing dataset (needs internet)")
    data_distribution: str = _opt("iid", choices=DATA_DISTRIBUTIONS, help="client data split ('non-iid' = 'dirichlet')")
    non_iid_alpha: float = _opt(0.5, lo=0.1, hi=5.0, help="Dirichlet concentration for the non-IID split")
    samples_per_client: Optional[int] = _opt(None, lo=1, hi=1_000_000, help="samples per client (default: all data split)")
    shards_per_client: int = _opt(2, lo=1, hi=100, help="label shards per client for data_distribution=shards")
    max_test_samples: Optional[int] = _opt(None, lo=10, hi=10_000_000, help="evaluate on the first N test samples only")
    max_train_samples: Optional[int] = _opt(None, lo=10, hi=10_000_000, help="use a seeded subset of N training samples")

    # --- model (seed names) ---
    model_type: str = _opt("cnn", choices=MODEL_TYPES, help="model architecture")
    num_classes: int = _opt(10, lo=2, hi=100000, help="output classes (must match the dataset)")
    hidden_size: int = _opt(256, lo=64, hi=1024, help="hidden layer width for the mlp")
    resnet_norm: str = _opt("group", choices=("group", "batch"), help="normalisation layers in the resnet")
    custom_model: Optional[str] = _opt(None, help="'package.module:factory' for model_type=custom")

    # --- local optimisation ---
    optimizer: str = _opt("sgd", choices=OPTIMIZERS, help="client optimizer")
    momentum: float = _opt(0.0, lo=0.0, hi=0.999, help="SGD momentum")
    weight_decay: float = _opt(0.0, lo=0.0, hi=1.0, help="L2 weight decay")
    lr_schedule: str = _opt("constant", choices=LR_SCHEDULES, help="client learning-rate schedule across rounds")
    lr_decay: float = _opt(0.99, lo=0.0, hi=1.0, lo_open=True, help="decay factor (per round for exponential, per step_size rounds for step)")
    lr_step_size: int = _opt(10, lo=1, hi=1000, help="rounds between decays for lr_schedule=step")
    proximal_mu: float = _opt(0.01, lo=0.0, hi=10.0, help="FedProx proximal coefficient mu (used by aggregation_method=fedprox)")
    server_learning_rate: float = _opt(1.0, lo=1e-4, hi=10.0, help="server step size applied to the aggregated update")

    # --- selection, rounds ---
    selection: str = _opt("uniform", choices=SELECTION_POLICIES, help="client selection policy")
    min_clients: int = _opt(1, lo=1, hi=10000, help="fewest updates that close a round")

    # --- communication (seed names) ---
    compression: bool = _opt(True, help="compress updates on the wire")
    encryption: bool = _opt(True, help="encrypt payloads on the wire (REST transport)")
    max_retries: int = _opt(3, lo=1, hi=10, help="communication retry attempts")
    timeout: float = _opt(30.0, lo=10.0, hi=300.0, help="communication timeout in seconds")
    codec: str = _opt("int8", help="update codec used when compression is on: none, float16, int8, topk:R, topk:R+int8 ...")
    wire_compression: str = _opt("zstd", choices=("none", "zlib", "zstd"), help="byte-level compression of payloads")

    # --- REST deployment ---
    round_timeout: float = _opt(600.0, lo=1.0, hi=86400.0, help="seconds a round waits for updates before closing with those that arrived")
    over_selection: float = _opt(0.3, lo=0.0, hi=4.0, help="select (1 + this) x clients_per_round to absorb dropouts")
    poll_interval: float = _opt(2.0, lo=0.05, hi=600.0, help="seconds between client polls suggested by the server")
    round_start_wait: float = _opt(10.0, lo=0.0, hi=86400.0, help="seconds to wait for clients_per_round live clients before starting a round with at least min_clients")
    client_liveness: float = _opt(60.0, lo=1.0, hi=86400.0, help="a client not heard from for this many seconds is not selected")
    session_ttl: float = _opt(3600.0, lo=10.0, hi=30 * 86400.0, help="lifetime of a session token in seconds")
    max_update_bytes: int = _opt(256 * 2**20, lo=1024, hi=2**34, help="largest request body the server reads (413 above)")

    # --- execution ---
    seed: int = _opt(0, lo=0, hi=2**31 - 1, help="seed for partitions, selection, initialisation and local shuffles")
    device: str = _opt("cpu", choices=("cpu", "cuda", "auto"), help="torch device")
    workers: int = _opt(-1, lo=-1, hi=256, help="parallel client workers in simulation (-1: one per core, 0: in-process)")
    threads_per_worker: int = _opt(1, lo=1, hi=256, help="torch threads in each client worker")
    eval_batch_size: int = _opt(1000, lo=1, hi=100000, help="batch size for evaluation (no gradients)")

    # ------------------------------------------------------------------ helpers
    @property
    def clients_per_round(self) -> int:
        """Clients selected each round: ceil-free rounding as Flower does, at least one."""
        return max(1, int(round(self.client_selection_ratio * self.num_clients)))

    @property
    def partition_method(self) -> str:
        return "dirichlet" if self.data_distribution == "non-iid" else self.data_distribution

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FLConfig":
        from fl_common.config.loading import config_from_dict

        merged = self.to_dict()
        merged.update(changes)
        return config_from_dict(merged)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FLConfig)]


def _describe_rule(meta: dict[str, Any], typ: Any) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    name = _type_name(typ)
    if lo is not None and hi is not None:
        left = "(" if meta.get("lo_open") else "["
        return f"{name} in {left}{lo:g}, {hi:g}]"
    return name


def _type_name(typ: Any) -> str:
    base, optional = _unwrap_optional(typ)
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, str(base))
    return name + (" or null" if optional else "")


def _unwrap_optional(typ: Any) -> tuple[Any, bool]:
    if get_origin(typ) is Union:
        args = [a for a in get_args(typ) if a is not type(None)]
        return args[0], True
    return typ, False


def coerce_value(name: str, value: Any) -> Any:
    """Check one value against its field's type and rules; return it in canonical type."""
    fields = {f.name: f for f in dataclasses.fields(FLConfig)}
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{name}'{hint}")
    f = fields[name]
    typ = get_type_hints(FLConfig)[name]
    base, optional = _unwrap_optional(typ)
    meta = dict(f.metadata)
    rule = _describe_rule(meta, typ)
    bad = ConfigError(f"config key '{name}' has value {value!r}: allowed {rule}")
    if value is None:
        if optional:
            return None
        raise bad
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise bad
    elif base is str:
        if not isinstance(value, str):
            raise bad
    if meta.get("choices") and value not in meta["choices"]:
        raise bad
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise bad
    if hi is not None and value > hi:
        raise bad
    return value


def check_consistency(cfg: FLConfig) -> None:
    """Rules that involve more than one key, and features that are configured but not built.

    A privacy or security switch that silently does nothing is the worst bug this project can
    have, so anything not built yet is refused here with the reason, never skipped.
    """
    if cfg.model_type == "custom" and not cfg.custom_model:
        raise ConfigError("config key 'custom_model' must be 'package.module:factory' when model_type is 'custom'")
    if cfg.custom_model is not None and ":" not in cfg.custom_model:
        raise ConfigError(f"config key 'custom_model' has value {cfg.custom_model!r}: allowed 'package.module:factory'")
    if cfg.min_clients > cfg.clients_per_round:
        raise ConfigError(
            f"config key 'min_clients' has value {cfg.min_clients}: allowed at most the {cfg.clients_per_round} "
            f"clients selected per round (client_selection_ratio x num_clients)"
        )
    if cfg.samples_per_client is not None and cfg.samples_per_client * cfg.num_clients > (cfg.max_train_samples or 10**12):
        raise ConfigError(
            f"config key 'samples_per_client' has value {cfg.samples_per_client}: {cfg.num_clients} clients x "
            f"{cfg.samples_per_client} exceeds max_train_samples={cfg.max_train_samples}"
        )
    if cfg.compression or cfg.codec != "int8":
        from fl_common.tensors.codecs import make_codec

        try:
            make_codec(cfg.codec)
        except ValueError as exc:
            raise ConfigError(f"config key 'codec' has value {cfg.codec!r}: {exc}") from None
    _check_privacy(cfg)
    if cfg.secure_aggregation:
        raise ConfigError(
            "config key 'secure_aggregation' is true, but secure aggregation is not built yet in this version: "
            "set secure_aggregation: false"
        )


def _check_privacy(cfg: FLConfig) -> None:
    """DP settings that cannot work together are refused, and so is DP configured but switched off.

    Rules that need the data (delta below 1/records for sample-level DP, a custom model without
    BatchNorm) are checked where the records and the model are known, before any training
    (fl_server/privacy_engine.py, fl_server/simulation/runner.py).
    """
    if not cfg.differential_privacy:
        stray = [(k, v) for k, v in (("dp_noise_multiplier", cfg.dp_noise_multiplier), ("dp_client_rounds", cfg.dp_client_rounds),
                                     ("dp_adaptive_clipping", cfg.dp_adaptive_clipping or None),
                                     ("dp_noise", "distributed" if cfg.dp_noise == "distributed" else None)) if v is not None]
        if stray:
            key, value = stray[0]
            raise ConfigError(f"config key '{key}' has value {value!r} but differential_privacy is false: no noise would be "
                              f"added; set differential_privacy: true, or remove '{key}'")
        return
    if cfg.dp_mode == "sample":
        for key, bad in (("dp_adaptive_clipping", cfg.dp_adaptive_clipping), ("dp_noise", cfg.dp_noise == "distributed")):
            if bad:
                raise ConfigError(f"config key '{key}' has value {getattr(cfg, key)!r}: it applies to dp_mode 'client' only "
                                  f"(sample-level DP-SGD clips and noises every step on the client)")
        if cfg.model_type == "resnet" and cfg.resnet_norm == "batch":
            raise ConfigError("config key 'resnet_norm' has value 'batch': BatchNorm mixes the examples of a batch, so "
                              "sample-level DP-SGD cannot bound one record's influence; set resnet_norm: group")
        if cfg.dp_client_rounds is not None and cfg.dp_client_rounds > cfg.num_rounds:
            raise ConfigError(f"config key 'dp_client_rounds' has value {cfg.dp_client_rounds}: a client takes part in at most "
                              f"num_rounds={cfg.num_rounds} rounds")
    else:
        if cfg.dp_client_rounds is not None:
            raise ConfigError(f"config key 'dp_client_rounds' has value {cfg.dp_client_rounds}: it applies to dp_mode 'sample' only")
        if cfg.dp_delta >= 1.0 / cfg.num_clients:
            raise ConfigError(f"config key 'dp_delta' has value {cfg.dp_delta:g}: client-level DP protects clients, so it must be "
                              f"below 1/num_clients = {1.0 / cfg.num_clients:.3g}")
