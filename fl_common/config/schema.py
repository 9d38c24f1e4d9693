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
import importlib.util
import re
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from fl_common.plugins import SELECTION_GROUP, STRATEGY_GROUP, PluginError, check_reference


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line meant for the user."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[Any, ...] | None = None, help: str = "", lo_open: bool = False) -> Any:
    """A dataclass field carrying its own validation rules in ``metadata``."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "help": help, "lo_open": lo_open})


#: Aggregation strategies the server can run. Kept here (not imported from fl_server) because
#: fl_common must not import the server; a test checks this list equals the strategy registry.
#: "custom" is a plug-in: the class named by ``custom_strategy`` (fl_server/strategies/factory.py).
AGGREGATION_METHODS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "qfedavg", "scaffold",
                       "median", "trimmed_mean", "krum", "multikrum", "custom")
#: Simulation-only model-poisoning attacks (fl_server/simulation/attacks.py), for robustness benchmarks.
ATTACKS = ("none", "gaussian_noise")
DATA_DISTRIBUTIONS = ("iid", "non-iid", "dirichlet", "shards")
DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODEL_TYPES = ("cnn", "mlp", "tanh_cnn", "tanh_cnn_gn", "relu_cnn", "scatter_linear", "scatter_cnn", "resnet", "custom")
OPTIMIZERS = ("sgd", "adam", "adagrad")
LR_SCHEDULES = ("constant", "step", "exponential", "cosine")
#: "custom" is a plug-in: the class named by ``custom_selection`` (fl_server/selection/factory.py).
SELECTION_POLICIES = ("uniform", "weighted", "stratified", "capability", "adaptive", "custom")
TRAINING_MODES = ("sync", "async")
#: where simulated clients train (fl_server/simulation/executor.py, ray_backend.py)
BACKENDS = ("process", "ray")
ASYNC_ALGORITHMS = ("fedasync", "fedbuff")
STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
DP_MODES = ("sample", "client")
DP_ACCOUNTANTS = ("prv", "rdp")
DP_NOISE_CALIBRATIONS = ("per_client", "uniform")
#: how secure aggregation hides the updates: pairwise masks (fl_common/secagg) or CKKS (fl_common/he)
SECURE_AGGREGATION_METHODS = ("masking", "ckks")


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
    secure_aggregation_method: str = _opt("masking", choices=SECURE_AGGREGATION_METHODS, help="how updates are hidden: 'masking' (SecAgg+, pairwise masks) or 'ckks' (homomorphic encryption, TenSEAL: pip install '.[he]'); see README 'Homomorphic encryption'")
    clip_grad_norm: float = _opt(1.0, lo=0.1, hi=5.0, help="L2 clipping norm for DP sensitivity")
    # Differential privacy (see fl_server/privacy/). Sample-level DP-SGD is the default: it
    # protects each training record, the guarantee the seed's "epsilon = 1 costs 3.1 points" refers to;
    # client-level DP-FedAvg protects a client's whole dataset but needs far more clients than 100 per
    # run to leave a usable model (the noise on the sum does not shrink with the cohort's data).
    dp_mode: str = _opt("sample", choices=DP_MODES, help="'sample': DP-SGD on each client (record-level); 'client': DP-FedAvg (client-level)")
    dp_accountant: str = _opt("prv", choices=DP_ACCOUNTANTS, help="privacy accountant: 'prv' (tight, Opacus' default) or 'rdp'")
    dp_noise_multiplier: float | None = _opt(None, lo=0.0, hi=1000.0, lo_open=True, help="noise multiplier override (default: calibrated from dp_epsilon, dp_delta, num_rounds)")
    dp_client_rounds: int | None = _opt(None, lo=1, hi=1000, help="sample level: rounds per client the noise is calibrated for (default: expected, ceil(num_rounds x selection ratio))")
    dp_noise_calibration: str = _opt("per_client", choices=DP_NOISE_CALIBRATIONS, help="sample level: 'per_client' calibrates each client's sigma for its own (q, steps) so every client spends the budget; 'uniform' gives every client the sigma of the worst-off one (ignored when dp_noise_multiplier is given)")
    dp_noise: str = _opt("central", choices=("central", "distributed"), help="'central': client level, the server adds the noise; sample level, each client's DP-SGD carries all of it. 'distributed' (needs secure_aggregation masking): each selected client adds its share, only the masked sum carries the whole noise; at sample level every round is then one DP-SGD step per client (README 'Differential privacy')")
    dp_sample_rate: float | None = _opt(None, lo=0.0, hi=1.0, lo_open=True, help="sample level with dp_noise distributed: the Poisson rate each client samples its records at for its one DP-SGD step per round (null: 0.5)")
    dp_adaptive_clipping: bool = _opt(False, help="client level: clip norm follows a quantile of update norms (Andrew et al. 2021)")
    dp_target_quantile: float = _opt(0.5, lo=0.0, hi=1.0, help="client level: target fraction of unclipped updates for adaptive clipping")
    # Secure aggregation (fl_common/secagg, fl_server/secagg): SecAgg with the SecAgg+ neighbour graph.
    # The field's width follows from the clip, the scale and the clients per round (bytes per value = ceil(bits/8)).
    secagg_threshold: float | None = _opt(None, lo=0.5, hi=1.0, lo_open=True, help="secure aggregation: Shamir threshold as a fraction of each client's share holders (its neighbours and itself); null: from the SecAgg+ failure bound (always a strict majority)")
    secagg_scale_bits: int = _opt(16, lo=1, hi=40, help="secure aggregation: fixed-point precision, values are rounded (stochastically) to multiples of 2^-scale_bits")
    secagg_clip_norm: float = _opt(10.0, lo=0.0, hi=1e6, lo_open=True, help="secure aggregation: L2 clip of each update (and SCAFFOLD variate delta) before encoding, the field's range; client-level DP uses clip_grad_norm instead")
    secagg_graph_degree: int | None = _opt(None, lo=2, hi=10000, help="secure aggregation: SecAgg+ neighbours per client (even; >= clients-1 is classic SecAgg); null: smallest degree meeting a 1e-6 failure bound")
    secagg_phase_timeout: float = _opt(60.0, lo=1.0, hi=86400.0, help="secure aggregation: seconds the key-advertisement, key-sharing and unmasking phases wait (the masked input waits round_timeout)")
    secagg_dropout_rate: float = _opt(0.0, lo=0.0, hi=0.9, help="simulation only: probability that a client drops out in each secure-aggregation phase (see secagg_dropout_phase)")
    secagg_dropout_phase: str = _opt("all", choices=("all", "advertise_keys", "share_keys", "masked_input", "unmask"), help="simulation only: the phase(s) secagg_dropout_rate applies to")

    # --- data (seed names) ---
    dataset: str = _opt("fashion_mnist", choices=DATASET_NAMES, help="dataset")
    data_dir: str | None = _opt(None, help="folder with the dataset files (default: Debian's /usr/share/datasets/...)")
    download: bool = _opt(False, help="allow torchvision to download a missing dataset (needs internet)")
    data_distribution: str = _opt("iid", choices=DATA_DISTRIBUTIONS, help="client data split ('non-iid' = 'dirichlet')")
    non_iid_alpha: float = _opt(0.5, lo=0.1, hi=5.0, help="Dirichlet concentration for the non-IID split")
    samples_per_client: int | None = _opt(None, lo=1, hi=1_000_000, help="samples per client (default: all data split)")
    shards_per_client: int = _opt(2, lo=1, hi=100, help="label shards per client for data_distribution=shards")
    max_test_samples: int | None = _opt(None, lo=10, hi=10_000_000, help="evaluate on the first N test samples only")
    max_train_samples: int | None = _opt(None, lo=10, hi=10_000_000, help="use a seeded subset of N training samples")

    # --- model (seed names) ---
    model_type: str = _opt("cnn", choices=MODEL_TYPES, help="model architecture")
    num_classes: int = _opt(10, lo=2, hi=100000, help="output classes (must match the dataset)")
    hidden_size: int = _opt(256, lo=8, hi=1024, help="hidden layer width of the mlp and of the tanh_cnn / tanh_cnn_gn / relu_cnn family (Papernot et al. use 32); channels of scatter_cnn's convolutions")
    resnet_norm: str = _opt("group", choices=("group", "batch"), help="normalisation layers in the resnet")
    custom_model: str | None = _opt(None, help="'package.module:factory' for model_type=custom")

    # --- local optimisation ---
    optimizer: str = _opt("sgd", choices=OPTIMIZERS, help="client optimizer")
    momentum: float = _opt(0.0, lo=0.0, hi=0.999, help="SGD momentum")
    weight_decay: float = _opt(0.0, lo=0.0, hi=1.0, help="L2 weight decay")
    lr_schedule: str = _opt("constant", choices=LR_SCHEDULES, help="client learning-rate schedule across rounds")
    lr_decay: float = _opt(0.99, lo=0.0, hi=1.0, lo_open=True, help="decay factor (per round for exponential, per step_size rounds for step)")
    lr_step_size: int = _opt(10, lo=1, hi=1000, help="rounds between decays for lr_schedule=step")
    proximal_mu: float = _opt(0.01, lo=0.0, hi=10.0, help="FedProx proximal coefficient mu (used by aggregation_method=fedprox)")
    server_learning_rate: float = _opt(1.0, lo=1e-4, hi=10.0, help="server step size applied to the aggregated update")
    # Server optimisers and the other strategies' own keys (fl_server/strategies/; each is read only by
    # the aggregation_method named in its help). fedadam/fedyogi/fedadagrad step about
    # server_learning_rate per coordinate whatever the update's scale: use 1e-2..1e-1, not FedAvg's 1.0.
    server_momentum: float = _opt(0.9, lo=0.0, hi=0.999, help="FedAvgM server momentum beta (aggregation_method=fedavgm; 0 = FedAvg)")
    # Post-processing of the global models the server already produced (fl_server/strategies/model_ema.py): no
    # privacy cost under DP; clients still train from the raw global model, the average is evaluated and released.
    server_model_ema: float = _opt(0.0, lo=0.0, hi=0.999, help="decay of an exponential moving average of the global model, "
                                   "evaluated and saved as the final model (0 = off; 0.9 averages over ~10 rounds); sync rounds only")
    server_beta1: float = _opt(0.9, lo=0.0, hi=0.999, help="first-moment decay of fedadam/fedyogi/fedadagrad (Reddi et al. 2021)")
    server_beta2: float = _opt(0.99, lo=0.0, hi=0.9999, help="second-moment decay of fedadam/fedyogi (fedadagrad ignores it)")
    server_tau: float = _opt(1e-3, lo=1e-9, hi=1.0, help="adaptivity tau of fedadam/fedyogi/fedadagrad: step = eta m / (sqrt(v) + tau), v starts at tau^2")
    qffl_q: float = _opt(1.0, lo=0.0, hi=50.0, help="q-FedAvg fairness q (aggregation_method=qfedavg; 0 = unweighted FedAvg, larger = fairer)")
    trim_ratio: float = _opt(0.2, lo=0.0, hi=0.5, help="trimmed_mean: fraction of updates dropped from each end of every coordinate")
    krum_byzantine: int = _opt(1, lo=0, hi=5000, help="krum/multikrum: number f of Byzantine clients tolerated (needs more than 2f + 2 updates per round)")
    multikrum_m: int | None = _opt(None, lo=1, hi=10000, help="multikrum: updates averaged (default: updates - krum_byzantine; a round with more than f attackers then averages one in, so set it to at most the honest updates of the worst round you expect)")
    custom_strategy: str | None = _opt(None, help="aggregation_method 'custom': the strategy plug-in, 'package.module:Class' (a subclass of fl_server.strategies.Strategy whose keyword constructor parameters are named after the config keys it reads) or a name an installed package registers under the entry-point group 'fl_hub.strategies'; see examples/plugins/README.md")

    # --- selection, rounds ---
    selection: str = _opt("uniform", choices=SELECTION_POLICIES, help="client selection policy (fl_server/selection): uniform, weighted (by records), stratified, capability (reported speeds), adaptive (the seed's p_k ~ n_k/sum n x 1/staleness_k x capability_k)")
    stratify_by: str = _opt("label", choices=("label", "size"), help="selection 'stratified': group clients by label distribution (k-means) or by number of records")
    num_strata: int = _opt(4, lo=1, hi=100, help="selection 'stratified': number of groups")
    selection_staleness_power: float = _opt(1.0, lo=-4.0, hi=4.0, help="selection 'adaptive': weight staleness_k^-power (1 = the seed's 1/staleness; negative favours clients that waited)")
    custom_selection: str | None = _opt(None, help="selection 'custom': the selection plug-in, 'package.module:Class' (a subclass of fl_server.selection.Selector; constructor parameters named after config keys, plus model_bytes) or a name an installed package registers under the entry-point group 'fl_hub.selection'; see examples/plugins/README.md")
    label_histogram_epsilon: float | None = _opt(None, lo=0.0, hi=10.0, lo_open=True, help="clients report label histograms with Laplace noise, pure epsilon-DP (null: exact; required when differential_privacy is on and stratify_by is label)")
    min_clients: int = _opt(1, lo=1, hi=10000, help="fewest updates that close a round")

    # --- communication (seed names) ---
    compression: bool = _opt(True, help="compress updates on the wire")
    encryption: bool = _opt(True, help="encrypt payloads on the wire (REST transport)")
    max_retries: int = _opt(3, lo=1, hi=10, help="communication retry attempts")
    timeout: float = _opt(30.0, lo=10.0, hi=300.0, help="communication timeout in seconds")
    codec: str = _opt("int8", help="update codec used when compression is on: none, float16, int8, topk:R, topk:R+int8 ...")
    wire_compression: str = _opt("zstd", choices=("none", "zlib", "zstd"), help="byte-level compression of payloads")
    download_codec: str = _opt("float32", choices=("float32", "float16"), help="how the global model goes down to clients: 'float32' (exact) or 'float16' (half the bytes and the client's decrypt + decode; clients train from the rounded model, the server keeps float32)")

    # --- REST deployment ---
    round_timeout: float = _opt(600.0, lo=1.0, hi=86400.0, help="seconds a round waits for updates before closing with those that arrived")
    over_selection: float = _opt(0.3, lo=0.0, hi=4.0, help="select (1 + this) x clients_per_round to absorb dropouts")
    poll_interval: float = _opt(2.0, lo=0.05, hi=600.0, help="seconds between client polls suggested by the server")
    round_start_wait: float = _opt(10.0, lo=0.0, hi=86400.0, help="seconds to wait for clients_per_round live clients before starting a round with at least min_clients")
    client_liveness: float = _opt(60.0, lo=1.0, hi=86400.0, help="a client not heard from for this many seconds is not selected")
    session_ttl: float = _opt(3600.0, lo=10.0, hi=30 * 86400.0, help="lifetime of a session token in seconds")
    max_update_bytes: int = _opt(256 * 2**20, lo=1024, hi=2**34, help="largest request body the server reads (413 above)")
    audit_retention_days: float = _opt(90.0, lo=1.0, hi=3650.0, help="security audit events older than this are deleted (the REST server's SQLite store)")
    audit_max_events: int = _opt(100_000, lo=1000, hi=10**8, help="the audit log keeps at most this many events (the newest)")
    shared_enrollment_max_clients: int | None = _opt(None, lo=0, hi=10**7, help="clients the shared enrollment token may register (default: num_clients; 0 turns the shared token off, so only admin-issued per-client tokens enrol: python -m fl_server admin enrollments create)")

    # --- asynchronous mode (fl_server/asynchronous): no rounds, clients upload when they finish ---
    training_mode: str = _opt("sync", choices=TRAINING_MODES, help="'sync': rounds; 'async': FedAsync/FedBuff, num_rounds counts server model updates and evaluation_frequency is per server update")
    async_algorithm: str = _opt("fedbuff", choices=ASYNC_ALGORITHMS, help="'fedasync' (Xie et al. 2019: mix each update in) or 'fedbuff' (Nguyen et al. 2022: apply the mean of K buffered updates)")
    async_alpha: float = _opt(0.6, lo=0.0, hi=1.0, lo_open=True, help="fedasync: mixing weight alpha; an update of staleness s is mixed in with alpha x s(staleness)")
    staleness_function: str = _opt("polynomial", choices=STALENESS_FUNCTIONS, help="weight s of a stale update: constant 1, polynomial (s+1)^-a, hinge 1 if s <= b else 1/(a(s-b)+1)")
    staleness_a: float = _opt(0.5, lo=0.0, hi=100.0, help="the staleness function's a (polynomial exponent, hinge slope)")
    staleness_b: float = _opt(4.0, lo=0.0, hi=100000.0, help="the hinge staleness function's b (staleness tolerated at full weight)")
    fedbuff_k: int = _opt(10, lo=1, hi=10000, help="fedbuff: client updates buffered per server update (K)")
    async_max_staleness: int | None = _opt(None, lo=0, hi=1000000, help="refuse updates trained on a model more than this many server updates old (null: no limit)")
    async_concurrency: int | None = _opt(None, lo=1, hi=10000, help="clients training at once in async mode (null: clients_per_round)")

    # --- simulated clients (simulation only): speeds that make staleness and capability real ---
    client_speed_distribution: str = _opt("constant", choices=("constant", "lognormal"), help="each client's simulated seconds per sample: all equal, or median x lognormal(0, client_speed_sigma), seeded")
    client_speed_sigma: float = _opt(1.0, lo=0.0, hi=5.0, help="sigma of the lognormal client speed distribution (also spreads network_delay)")
    client_seconds_per_sample: float = _opt(0.001, lo=0.0, hi=1000.0, lo_open=True, help="median simulated training seconds per sample")
    network_delay: float = _opt(0.0, lo=0.0, hi=86400.0, help="median simulated seconds per model transfer (download and upload each); 0: none")

    # --- execution ---
    seed: int = _opt(0, lo=0, hi=2**31 - 1, help="seed for partitions, selection, initialisation and local shuffles")
    device: str = _opt("cpu", help="torch device for training, evaluation, DP-SGD and aggregation: cpu, cuda (GPU 0), cuda:N (GPU N) or auto (cuda when available, else cpu)")
    backend: str = _opt("process", choices=BACKENDS, help="simulation only: where clients train: 'process' (a pool of worker processes on this machine) or 'ray' (Ray tasks on a Ray cluster; pip install '.[ray]')")
    ray_address: str | None = _opt(None, help="backend ray: the cluster to join (e.g. 10.0.0.1:6379, or 'auto' for the one started with ray start on this node); null: start a private one-node Ray")
    ray_num_cpus: float = _opt(1.0, lo=0.0, hi=1024.0, help="backend ray: CPUs reserved per client task")
    ray_num_gpus: float = _opt(0.0, lo=0.0, hi=64.0, help="backend ray: GPUs reserved per client task (fractions share a GPU)")
    client_evaluation: str = _opt("auto", choices=("auto", "on", "off"), help="simulation only: after the last round, evaluate the final global model on every client's data (client_accuracy.csv, summary client_accuracy); auto: only with a held-out part (client_test_fraction > 0) or for qfedavg, whose fairness it measures")
    workers: int = _opt(-1, lo=-1, hi=256, help="parallel client workers in simulation (-1: one per core, 0: in-process)")
    threads_per_worker: int = _opt(1, lo=1, hi=256, help="torch threads in each client worker")
    eval_batch_size: int = _opt(1000, lo=1, hi=100000, help="batch size for evaluation (no gradients)")

    # --- simulated attacks (simulation only; the REST server refuses attack != none) ---
    attack: str = _opt("none", choices=ATTACKS, help="simulation only: 'gaussian_noise' makes a fixed seeded subset of clients send N(0, attack_noise_std^2) instead of their update")
    attack_fraction: float = _opt(0.2, lo=0.0, hi=1.0, help="fraction of the clients that attack (round(fraction x num_clients), chosen once from the seed)")
    attack_noise_std: float = _opt(1.0, lo=0.0, hi=1e6, lo_open=True, help="per-coordinate std of an attacker's noise update")

    # --- personalization (simulation only; fl_server/simulation/personalization.py) ---
    client_test_fraction: float = _opt(0.0, lo=0.0, hi=1.0, help="simulation only: fraction of each client's data held out (seeded by seed and client) for per-client evaluation; the federation trains on the rest (0: no split, per-client accuracy is measured on the training data)")
    finetune_epochs: int = _opt(0, lo=0, hi=100, help="simulation only: after training, fine-tune the final global model on each client's own training part for this many epochs and evaluate it on the held-out part (0: off; needs client_test_fraction > 0)")
    local_only_epochs: int = _opt(0, lo=0, hi=1000, help="simulation only: epochs of the local-only baseline, each client trained alone from the initial model (0: off; simulate --local-only needs it)")
    local_only_test_samples: int | None = _opt(None, lo=1, hi=10_000_000, help="simulate --local-only: evaluate each client's model on its own seeded random subset of this many test samples (null: the whole test set); the mean over clients stays an unbiased estimate of the mean test-set accuracy at a fraction of the cost")

    # ------------------------------------------------------------------ helpers
    @property
    def download_wire_codec(self) -> str:
        """The wire codec (fl_common/tensors/codecs.py) the global model is packed with for clients."""
        return "none" if self.download_codec == "float32" else "float16"

    @property
    def clients_per_round(self) -> int:
        """Clients selected each round: ceil-free rounding as Flower does, at least one."""
        return max(1, round(self.client_selection_ratio * self.num_clients))

    @property
    def partition_method(self) -> str:
        return "dirichlet" if self.data_distribution == "non-iid" else self.data_distribution

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """(base type, optional) of ``X``, ``Optional[X]`` or ``X | None`` (PEP 604 unions have their own origin)."""
    if get_origin(typ) in (Union, types.UnionType):
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
    elif base is str and not isinstance(value, str):
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
    _check_execution(cfg)
    _check_aggregation(cfg)
    _check_privacy(cfg)
    _check_selection(cfg)
    _check_async(cfg)
    _check_personalization(cfg)
    _check_secure_aggregation(cfg)


#: the device spellings (the same pattern as fl_common.training.device, which imports config, not the reverse)
_DEVICE = re.compile(r"cpu|auto|cuda(:\d{1,3})?")


def _check_execution(cfg: FLConfig) -> None:
    """The device's spelling, and the Ray backend's keys (ray is an optional extra: refused with the
    install command when missing, rather than failing at the first round)."""
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"config key 'device' has value {cfg.device!r}: allowed 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'auto'")
    if cfg.backend != "ray":
        _refuse_stray(cfg, ("ray_address", "ray_num_cpus", "ray_num_gpus"), "backend is not 'ray'")
        return
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("config key 'backend' has value 'ray' but Ray is not installed: pip install 'ray>=2.9' "
                          "(or pip install '.[ray]' in this project), or set backend: process")
    if cfg.training_mode == "async":
        raise ConfigError("backend 'ray' runs synchronous rounds only: set training_mode: sync, or backend: process")


#: secagg keys a run without secure aggregation must leave at their defaults (they would do nothing)
_SECAGG_KEYS = ("secagg_threshold", "secagg_scale_bits", "secagg_clip_norm", "secagg_graph_degree", "secagg_phase_timeout",
                "secagg_dropout_rate", "secagg_dropout_phase")


def _check_secure_aggregation(cfg: FLConfig) -> None:
    """Secure aggregation runs in the simulation; whether a driver runs it is checked where the driver
    builds its coordinator (fl_server/coordinator.py, driver feature "secure_aggregation"), so the REST
    server still refuses it with a message until it carries the protocol."""
    if not cfg.secure_aggregation:
        _refuse_stray(cfg, (*_SECAGG_KEYS, "secure_aggregation_method"), "secure_aggregation is false")
        return
    if cfg.secure_aggregation_method == "ckks":
        _check_ckks(cfg)
        return
    if cfg.training_mode == "async":
        raise ConfigError("training_mode 'async' with secure_aggregation: asynchronous aggregation of masked updates is not "
                          "built yet: set secure_aggregation: false or training_mode: sync")
    if cfg.compression and "topk" in cfg.codec.lower():
        raise ConfigError(f"config key 'codec' has value {cfg.codec!r}: sparsification cannot run under secure aggregation "
                          f"(masked vectors are dense and uniform; the secure sum is quantised to secagg_scale_bits fixed "
                          f"point and sent at the field's width instead): use codec int8 or none, or compression: false")
    if cfg.secagg_dropout_rate == 0.0:
        _refuse_stray(cfg, ("secagg_dropout_phase",), "secagg_dropout_rate is 0")
    if cfg.secagg_graph_degree is not None and cfg.secagg_graph_degree < cfg.clients_per_round - 1 \
            and cfg.secagg_graph_degree % 2:
        raise ConfigError(f"config key 'secagg_graph_degree' has value {cfg.secagg_graph_degree}: a SecAgg+ degree below "
                          f"clients per round - 1 = {cfg.clients_per_round - 1} must be even (a ring lattice)")
    if cfg.clients_per_round < 3:
        raise ConfigError(f"secure aggregation needs at least 3 clients per round, and client_selection_ratio x num_clients "
                          f"selects {cfg.clients_per_round}: raise them, or set secure_aggregation: false")


#: masking-only keys a CKKS run must leave at their defaults (secagg_clip_norm is CKKS's clip too)
_MASKING_ONLY_KEYS = ("secagg_threshold", "secagg_scale_bits", "secagg_graph_degree")


def _check_ckks(cfg: FLConfig) -> None:
    """What CKKS aggregation (fl_common/he) cannot be combined with. The codec: ciphertexts are the wire format and
    their size does not depend on the values, so int8/float16 are not applied (as under masking) and top-k cannot be
    (a sparse update would reveal its support, and the sum of supports is not sparse)."""
    _refuse_stray(cfg, _MASKING_ONLY_KEYS, "secure_aggregation_method is 'ckks' (they configure masking)")
    if importlib.util.find_spec("tenseal") is None:  # found, not imported: fl_common.he imports it when a round runs
        raise ConfigError("secure_aggregation_method 'ckks' needs the optional HE backend TenSEAL, which is not installed: "
                          "pip install '.[he]'  (or: pip install 'tenseal>=0.3.15,<0.4'); or set secure_aggregation_method: "
                          "masking")
    if cfg.training_mode == "async":
        raise ConfigError("training_mode 'async' with secure_aggregation_method 'ckks' is not built: set training_mode: sync")
    if cfg.aggregation_method == "scaffold":
        raise ConfigError("aggregation_method 'scaffold' with secure_aggregation_method 'ckks' is not built (the variate "
                          "deltas would need a second encrypted vector): use secure_aggregation_method: masking")
    if cfg.compression and "topk" in cfg.codec.lower():
        raise ConfigError(f"config key 'codec' has value {cfg.codec!r}: sparsification cannot run under CKKS aggregation "
                          f"(ciphertexts are dense and their size does not depend on the values): use codec int8 or none, "
                          f"or compression: false")
    if cfg.secagg_dropout_phase not in ("all", "masked_input", "unmask"):
        raise ConfigError(f"config key 'secagg_dropout_phase' has value {cfg.secagg_dropout_phase!r}: CKKS rounds have no "
                          f"key-sharing phases; allowed: all, masked_input (after encrypting), unmask (the decryptor)")
    if cfg.secagg_dropout_rate == 0.0:
        _refuse_stray(cfg, ("secagg_dropout_phase",), "secagg_dropout_rate is 0")
    if cfg.clients_per_round < 2:
        raise ConfigError(f"CKKS aggregation needs at least 2 clients per round, and client_selection_ratio x num_clients "
                          f"selects {cfg.clients_per_round}: raise them, or set secure_aggregation: false")


def _check_privacy(cfg: FLConfig) -> None:
    """DP settings that cannot work together are refused, and so is DP configured but switched off.

    Rules that need the data (delta below 1/records for sample-level DP, a custom model without
    BatchNorm) are checked where the records and the model are known, before any training
    (fl_server/privacy/, fl_server/simulation/runner.py).
    """
    if not cfg.differential_privacy:
        stray = [(k, v) for k, v in (("dp_noise_multiplier", cfg.dp_noise_multiplier), ("dp_client_rounds", cfg.dp_client_rounds),
                                     ("dp_adaptive_clipping", cfg.dp_adaptive_clipping or None),
                                     ("dp_noise", "distributed" if cfg.dp_noise == "distributed" else None),
                                     ("dp_sample_rate", cfg.dp_sample_rate),
                                     ("dp_noise_calibration",
                                      None if cfg.dp_noise_calibration == "per_client" else cfg.dp_noise_calibration))
                 if v is not None]
        if stray:
            key, value = stray[0]
            raise ConfigError(f"config key '{key}' has value {value!r} but differential_privacy is false: no noise would be "
                              f"added; set differential_privacy: true, or remove '{key}'")
        return
    _check_distributed_noise(cfg)
    if cfg.dp_mode == "sample":
        if cfg.dp_adaptive_clipping:
            raise ConfigError(f"config key 'dp_adaptive_clipping' has value {cfg.dp_adaptive_clipping!r}: it applies to dp_mode "
                              f"'client' only (sample-level DP-SGD clips every record's gradient at clip_grad_norm)")
        if cfg.model_type == "resnet" and cfg.resnet_norm == "batch":
            raise ConfigError("config key 'resnet_norm' has value 'batch': BatchNorm mixes the examples of a batch, so "
                              "sample-level DP-SGD cannot bound one record's influence; set resnet_norm: group")
        if cfg.dp_client_rounds is not None and cfg.dp_client_rounds > cfg.num_rounds:
            raise ConfigError(f"config key 'dp_client_rounds' has value {cfg.dp_client_rounds}: a client takes part in at most "
                              f"num_rounds={cfg.num_rounds} rounds")
    else:
        if cfg.dp_client_rounds is not None:
            raise ConfigError(f"config key 'dp_client_rounds' has value {cfg.dp_client_rounds}: it applies to dp_mode 'sample' only")
        if cfg.dp_noise_calibration != "per_client":
            raise ConfigError(f"config key 'dp_noise_calibration' has value {cfg.dp_noise_calibration!r}: it applies to dp_mode "
                              f"'sample' only (client-level DP has one noise multiplier for the aggregate)")
        if cfg.dp_delta >= 1.0 / cfg.num_clients:
            raise ConfigError(f"config key 'dp_delta' has value {cfg.dp_delta:g}: client-level DP protects clients, so it must be "
                              f"below 1/num_clients = {1.0 / cfg.num_clients:.3g}")


def _check_distributed_noise(cfg: FLConfig) -> None:
    """Distributed noise is only as strong as the masking that hides each share: refused without it.

    Each selected client adds only its share of the noise, so without masking the server would see every update
    nearly in the clear and the accountant's epsilon, which covers the sum, would not hold for one update. At
    sample level the sum must hold a whole number of DP-SGD steps (one per client per round, every client at one
    Poisson rate) for the noise shares to add up to one Gaussian mechanism: local epochs and batch sizes do not
    apply, and the rate is dp_sample_rate."""
    if cfg.dp_noise != "distributed":
        if cfg.dp_sample_rate is not None:
            raise ConfigError(f"config key 'dp_sample_rate' has value {cfg.dp_sample_rate!r}: it applies to dp_mode 'sample' "
                              f"with dp_noise 'distributed' only (otherwise each client's rate is batch_size / its records)")
        return
    if not cfg.secure_aggregation:
        raise ConfigError("config key 'dp_noise' has value 'distributed' but secure_aggregation is false: each client "
                          "adds only its share of the noise, so the server would see every update nearly in the clear "
                          "and the epsilon (which covers the sum) would not hold for one update; set secure_aggregation: "
                          "true, or dp_noise: central")
    if cfg.dp_mode == "sample":
        if cfg.secure_aggregation_method != "masking":
            raise ConfigError(f"config key 'dp_noise' has value 'distributed' at dp_mode 'sample' but "
                              f"secure_aggregation_method is {cfg.secure_aggregation_method!r}: sample-level distributed "
                              f"noise is built for masking (its sum's range is sized for the noisy steps); set "
                              f"secure_aggregation_method: masking, or dp_noise: central")
        if cfg.optimizer != "sgd":
            raise ConfigError(f"config key 'optimizer' has value {cfg.optimizer!r}: with dp_noise 'distributed' at sample level "
                              f"a client's step must be linear in its noisy gradient for the shares to add up to one "
                              f"Gaussian (an adaptive optimizer rescales each client's noise on its own); set optimizer: sgd "
                              f"(a server optimizer such as fedadam still works on the sum)")
        if cfg.weight_decay > 0:
            raise ConfigError(f"config key 'weight_decay' has value {cfg.weight_decay:g}: with dp_noise 'distributed' at sample "
                              f"level a client's step must be its noisy clipped gradient alone (the masked range is sized "
                              f"for it); set weight_decay: 0, or dp_noise: central")
        if cfg.aggregation_method not in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
            raise ConfigError(f"config key 'aggregation_method' has value {cfg.aggregation_method!r}: with dp_noise "
                              f"'distributed' the server must apply the plain weighted sum of the clients' noisy steps "
                              f"(fedavg, or a server optimizer over it: fedavgm, fedadam, fedyogi, fedadagrad)")
    elif cfg.dp_sample_rate is not None:
        raise ConfigError(f"config key 'dp_sample_rate' has value {cfg.dp_sample_rate!r}: it applies to dp_mode 'sample' "
                          f"only (client-level DP samples clients, not records)")


def _check_aggregation(cfg: FLConfig) -> None:
    """A strategy's own keys whose values cannot work, refused with the reason.

    What a strategy can be combined with (secure aggregation, differential privacy, a driver's
    features) depends on the strategy class, which fl_common cannot import: it is checked by
    fl_server.strategies.check_strategy_features when a driver starts. Only the value checks that
    need nothing but the configuration stay here."""
    method = cfg.aggregation_method
    _check_plugin(cfg, "custom_strategy", method == "custom", "aggregation_method", STRATEGY_GROUP)
    n = cfg.clients_per_round
    if method == "trimmed_mean":
        k = int(cfg.trim_ratio * n + 1e-9)
        if 2 * k >= n:
            raise ConfigError(f"config key 'trim_ratio' has value {cfg.trim_ratio:g}: with {n} clients per round it trims {k} "
                              f"updates from each end, leaving none to average (allowed: trim_ratio x clients_per_round < "
                              f"clients_per_round / 2)")
        if k == 0:
            raise ConfigError(f"config key 'trim_ratio' has value {cfg.trim_ratio:g}: with {n} clients per round it trims no "
                              f"update (floor({cfg.trim_ratio:g} x {n}) = 0), so the trimmed mean would resist no outlier; "
                              f"allowed: at least 1 / clients_per_round = {1 / n:.3g}")
    if method in ("krum", "multikrum"):
        f = cfg.krum_byzantine
        if n <= 2 * f + 2:
            raise ConfigError(f"config key 'krum_byzantine' has value {f}: Krum tolerates f Byzantine clients only among more "
                              f"than 2f + 2 = {2 * f + 2} updates, and a round selects {n} (client_selection_ratio x num_clients)")
        if cfg.min_clients <= 2 * f + 2:
            raise ConfigError(f"config key 'min_clients' has value {cfg.min_clients}: with krum_byzantine={f}, Krum needs more "
                              f"than 2f + 2 = {2 * f + 2} updates in every round it aggregates, and a round may close with "
                              f"min_clients updates; set min_clients to at least {2 * f + 3}")
        if method == "multikrum" and cfg.multikrum_m is not None and cfg.multikrum_m > n - f:
            raise ConfigError(f"config key 'multikrum_m' has value {cfg.multikrum_m}: Multi-Krum averages at most "
                              f"updates - krum_byzantine = {n} - {f} = {n - f} updates per round")
    if cfg.attack != "none" and round(cfg.attack_fraction * cfg.num_clients) < 1:
        raise ConfigError(f"config key 'attack_fraction' has value {cfg.attack_fraction:g}: round({cfg.attack_fraction:g} x "
                          f"{cfg.num_clients} clients) = 0 attackers, so attack '{cfg.attack}' would do nothing")


def _default(name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(FLConfig)}[name]


def _refuse_stray(cfg: FLConfig, keys: tuple[str, ...], why: str) -> None:
    """A key changed from its default that the configured mode does not read is refused, not ignored."""
    for key in keys:
        if getattr(cfg, key) != _default(key):
            raise ConfigError(f"config key '{key}' has value {getattr(cfg, key)!r} but {why}; remove '{key}'")


def _check_plugin(cfg: FLConfig, key: str, chosen: bool, chooser: str, group: str) -> None:
    """``key`` names a plug-in class: required when ``chooser`` is 'custom', refused otherwise, and
    of the form 'package.module:Class' or an installed entry-point name (nothing imported here)."""
    value = getattr(cfg, key)
    if not chosen:
        if value is not None:
            raise ConfigError(f"config key '{key}' has value {value!r} but {chooser} is {getattr(cfg, chooser)!r}, not 'custom'; "
                              f"set {chooser}: custom, or remove '{key}'")
        return
    if not value:
        raise ConfigError(f"config key '{key}' must name the plug-in when {chooser} is 'custom': 'package.module:Class' or a "
                          f"name registered under the entry-point group '{group}'")
    try:
        check_reference(value, kind="Class", group=group)
    except PluginError as exc:
        raise ConfigError(f"config key '{key}' has value {value!r}: {exc}") from None


def _check_selection(cfg: FLConfig) -> None:
    """Selection settings that would be ignored, or that would leak what privacy promises to hide."""
    _check_plugin(cfg, "custom_selection", cfg.selection == "custom", "selection", SELECTION_GROUP)
    if cfg.selection != "stratified":
        _refuse_stray(cfg, ("stratify_by", "num_strata"), f"selection is '{cfg.selection}', not 'stratified'")
    if cfg.selection != "adaptive":
        _refuse_stray(cfg, ("selection_staleness_power",), f"selection is '{cfg.selection}', not 'adaptive'")
    uses_labels = cfg.selection == "stratified" and cfg.stratify_by == "label"
    if cfg.label_histogram_epsilon is not None and not uses_labels:
        raise ConfigError(f"config key 'label_histogram_epsilon' has value {cfg.label_histogram_epsilon!r} but no selection "
                          f"policy reads label histograms (only selection 'stratified' with stratify_by 'label'); remove it")
    if uses_labels and cfg.differential_privacy and cfg.label_histogram_epsilon is None:
        raise ConfigError("selection 'stratified' with stratify_by 'label' shares each client's label histogram, which "
                          "differential privacy must cover: set label_histogram_epsilon (Laplace noise, pure epsilon-DP), "
                          "or stratify_by: size")
    if cfg.selection == "stratified" and cfg.num_strata > cfg.num_clients:
        raise ConfigError(f"config key 'num_strata' has value {cfg.num_strata}: allowed at most num_clients={cfg.num_clients}")
    if cfg.differential_privacy and cfg.dp_mode == "client" and cfg.selection != "uniform":
        raise ConfigError(f"selection '{cfg.selection}' with dp_mode 'client': client-level DP-FedAvg's accountant assumes "
                          f"Poisson sampling of every client with the same probability (clients_per_round / num_clients), which "
                          f"the coordinator then draws itself; another policy would be ignored, so use selection: uniform")
    if cfg.client_speed_distribution == "constant":
        _refuse_stray(cfg, ("client_speed_sigma",), "client_speed_distribution is 'constant'")


def _check_personalization(cfg: FLConfig) -> None:
    """Held-out split, fine-tuning and the local-only baseline: values that cannot mean anything are refused.

    Fine-tuned accuracy measured on the data the model was just fine-tuned on would report
    memorisation, so fine-tuning needs a held-out part. The asynchronous driver does not write
    per-client results, so the keys are refused there rather than holding data out for nothing."""
    if cfg.client_test_fraction >= 1.0:
        raise ConfigError(f"config key 'client_test_fraction' has value {cfg.client_test_fraction:g}: it would hold out all of a "
                          f"client's data and leave nothing to train on; allowed 0 <= client_test_fraction < 1 (e.g. 0.2)")
    if cfg.finetune_epochs > 0 and cfg.client_test_fraction == 0.0:
        raise ConfigError(f"config key 'finetune_epochs' has value {cfg.finetune_epochs} but client_test_fraction is 0: the "
                          f"fine-tuned model could only be evaluated on the data it was fine-tuned on; set "
                          f"client_test_fraction (e.g. 0.2)")
    if cfg.training_mode == "async":
        for key in ("client_test_fraction", "finetune_epochs", "local_only_epochs", "local_only_test_samples"):
            if getattr(cfg, key) != _default(key):
                raise ConfigError(f"config key '{key}' has value {getattr(cfg, key)!r}: per-client held-out evaluation and "
                                  f"personalization are built for training_mode 'sync' only; remove '{key}'")


#: The synchronous strategies whose client side and server step make sense one update at a time.
ASYNC_AGGREGATION_METHODS = ("fedavg", "fedprox")
_ASYNC_KEYS = ("async_algorithm", "async_alpha", "staleness_function", "staleness_a", "staleness_b", "fedbuff_k",
               "async_max_staleness", "async_concurrency")


def _check_async(cfg: FLConfig) -> None:
    """Asynchronous mode: keys that would be ignored and combinations not built."""
    if cfg.training_mode != "async":
        _refuse_stray(cfg, _ASYNC_KEYS, "training_mode is 'sync'")
        return
    if cfg.differential_privacy:
        raise ConfigError("training_mode 'async' with differential_privacy: the privacy engine accounts rounds, and "
                          "asynchronous training has none; it is not built yet: set differential_privacy: false or "
                          "training_mode: sync")
    if cfg.aggregation_method not in ASYNC_AGGREGATION_METHODS:
        raise ConfigError(f"config key 'aggregation_method' has value {cfg.aggregation_method!r}: in training_mode 'async' "
                          f"the server step is async_algorithm's ({cfg.async_algorithm}); allowed "
                          f"{', '.join(ASYNC_AGGREGATION_METHODS)} (their client side)")
    _refuse_stray(cfg, ("server_model_ema",), "training_mode is 'async' (the model average is kept per synchronous round)")
    if cfg.async_algorithm == "fedasync":
        _refuse_stray(cfg, ("fedbuff_k",), "async_algorithm is 'fedasync' (it applies every update)")
        _refuse_stray(cfg, ("server_learning_rate",), "async_algorithm 'fedasync' steps with async_alpha")
    else:
        _refuse_stray(cfg, ("async_alpha",), "async_algorithm is 'fedbuff' (its step is server_learning_rate)")
    if cfg.staleness_function == "constant":
        _refuse_stray(cfg, ("staleness_a", "staleness_b"), "staleness_function is 'constant'")
    elif cfg.staleness_function == "polynomial":
        _refuse_stray(cfg, ("staleness_b",), "staleness_function is 'polynomial' ((s+1)^-a has no b)")
    if cfg.async_concurrency is not None and cfg.async_concurrency > cfg.num_clients:
        raise ConfigError(f"config key 'async_concurrency' has value {cfg.async_concurrency}: allowed at most "
                          f"num_clients={cfg.num_clients} (a client trains one model at a time)")
