"""What a REST client tells the server about itself for client selection, and how it is checked.

Why a profile separate from registration: a daemon learns its data only after registering (the
server assigns its partition), so the facts the selection policies read - records, label
histogram, training speed, link speed - arrive afterwards, at ``POST /api/v1/profile``. This module
is the transport-free part: which fields the configured policy needs (:func:`profile_spec`), the
validation of a report (:func:`validate_profile`, raising :class:`ProfileError` with an HTTP status
and a code), and the :class:`ClientInfo` a stored profile becomes (:func:`client_info`).

Rules, so that a client discloses no more than the policy uses:

* ``num_samples`` is always required (public by this project's convention: the privacy engine
  plans sample-level DP-SGD from it). Under sample-level DP it must equal the size of the
  client's assigned partition, which the server derives itself (the same check as registration).
* ``capability`` may carry only ``compute_speed`` (samples/s) and ``bandwidth`` (bytes/s), each a
  finite number in (0, 1e15]; ``compute_speed`` is required by ``capability`` and ``adaptive``,
  which also read ``bandwidth`` when given (the spec lists only what the policy reads, so a
  daemon measures its speed only when it is used).
* ``label_histogram`` is accepted only when ``selection: stratified`` with ``stratify_by: label``
  asks for it: ``num_classes`` finite counts >= 0. With ``label_histogram_epsilon`` the client
  sends Laplace-noised counts (fl_common.privacy.private_label_histogram); without it the counts
  must be exact: whole numbers that add up to ``num_samples``.

Under any policy but ``uniform`` a client without a profile is not a candidate for selection
(it is live, but not selectable): the policies need what the profile says, and defaults would
silently bias them. Under ``uniform`` the profile is optional and unused by the draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fl_common.config import FLConfig
from fl_common.protocol.rest import (
    CAPABILITY_BANDWIDTH,
    CAPABILITY_COMPUTE_SPEED,
    CAPABILITY_NAMES,
    MAX_CAPABILITY_VALUE,
    MAX_PROFILE_SAMPLES,
    PROFILE_LABEL_HISTOGRAM,
    PROFILE_NUM_SAMPLES,
    ProfileSpec,
)
from fl_server.selection import ClientInfo

__all__ = ["ProfileError", "client_info", "profile_spec", "validate_profile", "wants_label_histogram"]

#: the largest single count of an exact or noised histogram bin
MAX_HISTOGRAM_COUNT = float(MAX_PROFILE_SAMPLES)


class ProfileError(Exception):
    """A profile report refused: HTTP ``status``, machine ``code`` and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def wants_label_histogram(cfg: FLConfig) -> bool:
    return cfg.selection == "stratified" and cfg.stratify_by == "label"


def profile_spec(cfg: FLConfig, stored: Mapping[str, Any] | None = None) -> ProfileSpec:
    """The fields the configured selection policy reads, for ``GET /api/v1/profile``."""
    required = [PROFILE_NUM_SAMPLES]
    optional: list[str] = []
    if cfg.selection in ("capability", "adaptive"):  # T_k = E n_k / compute_speed_k + 2 model_bytes / bandwidth_k
        required.append(CAPABILITY_COMPUTE_SPEED)
        optional.append(CAPABILITY_BANDWIDTH)
    if wants_label_histogram(cfg):
        required.append(PROFILE_LABEL_HISTOGRAM)
    return ProfileSpec(policy=cfg.selection, required=required, optional=optional, num_classes=cfg.num_classes,
                       label_histogram_epsilon=cfg.label_histogram_epsilon if wants_label_histogram(cfg) else None,
                       needed_for_selection=cfg.selection != "uniform", profile=dict(stored) if stored else None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def validate_profile(cfg: FLConfig, body: Any, *, partition_size: int | None = None) -> dict[str, Any]:
    """The profile to store (num_samples, capability, label_histogram), or :class:`ProfileError`.

    ``partition_size``: the record count the server derived for the client's partition (sample-level
    DP plans from it), which the reported ``num_samples`` must equal."""
    if not isinstance(body, dict):
        raise ProfileError(400, "bad_json", "the request body must be a JSON object")
    unknown = sorted(set(body) - {PROFILE_NUM_SAMPLES, "capability", PROFILE_LABEL_HISTOGRAM})
    if unknown:
        raise ProfileError(400, "bad_profile", f"unknown profile field {unknown[0]!r}: allowed num_samples, capability, "
                                               f"label_histogram")
    spec = profile_spec(cfg)
    num_samples = body.get(PROFILE_NUM_SAMPLES)
    if num_samples is None:
        raise ProfileError(422, "profile_incomplete", "num_samples is required")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_PROFILE_SAMPLES:
        raise ProfileError(400, "bad_num_samples", f"num_samples must be an integer from 1 to {MAX_PROFILE_SAMPLES}")
    if partition_size is not None and num_samples != partition_size:
        raise ProfileError(409, "num_samples_mismatch", f"the client's partition holds {partition_size} records, the profile "
                                                        f"reports {num_samples}; sample-level DP is planned from the partition's size")
    capability = body.get("capability") or {}
    if not isinstance(capability, dict) or len(capability) > len(CAPABILITY_NAMES):
        raise ProfileError(400, "bad_capability", f"capability must be an object with at most {', '.join(CAPABILITY_NAMES)}")
    checked: dict[str, float] = {}
    for name, raw in capability.items():
        if name not in CAPABILITY_NAMES:
            raise ProfileError(400, "bad_capability", f"unknown capability {str(name)[:40]!r}: allowed {', '.join(CAPABILITY_NAMES)} "
                                                      f"(compute_speed in samples/s, bandwidth in bytes/s)")
        value = _number(raw)
        if value is None or not 0.0 < value <= MAX_CAPABILITY_VALUE:
            raise ProfileError(400, "bad_capability", f"capability {name} must be a finite number in (0, {MAX_CAPABILITY_VALUE:g}]")
        checked[name] = value
    missing = [f for f in spec.required if f in CAPABILITY_NAMES and f not in checked]
    if missing:
        raise ProfileError(422, "profile_incomplete", f"selection '{cfg.selection}' needs capability {missing[0]}")
    histogram = body.get(PROFILE_LABEL_HISTOGRAM)
    if histogram is not None and PROFILE_LABEL_HISTOGRAM not in spec.required:
        raise ProfileError(400, "label_histogram_not_wanted", f"selection '{cfg.selection}' does not read label histograms; "
                                                              f"a client does not disclose one here")
    if histogram is None and PROFILE_LABEL_HISTOGRAM in spec.required:
        raise ProfileError(422, "profile_incomplete", "selection 'stratified' by label needs the label_histogram")
    counts: list[float] | None = None
    if histogram is not None:
        if not isinstance(histogram, list) or len(histogram) != cfg.num_classes:
            raise ProfileError(400, "bad_label_histogram", f"label_histogram must be a list of num_classes={cfg.num_classes} counts")
        counts = [v for v in (_number(x) for x in histogram) if v is not None and 0.0 <= v <= MAX_HISTOGRAM_COUNT]
        if len(counts) != cfg.num_classes:
            raise ProfileError(400, "bad_label_histogram", f"label_histogram counts must be finite numbers in [0, {MAX_HISTOGRAM_COUNT:g}]")
        if cfg.label_histogram_epsilon is None and (any(c != int(c) for c in counts) or int(sum(counts)) != num_samples):
            raise ProfileError(422, "label_histogram_mismatch", f"exact label counts must be whole numbers adding up to "
                                                                f"num_samples={num_samples}")
    profile: dict[str, Any] = {PROFILE_NUM_SAMPLES: num_samples, "capability": checked}
    if counts is not None:
        profile[PROFILE_LABEL_HISTOGRAM] = counts
    return profile


def client_info(client_id: str, profile: Mapping[str, Any] | None) -> ClientInfo | None:
    """The ClientInfo of a stored profile (None without one, or when it no longer reads as valid)."""
    if not profile:
        return None
    capability = profile.get("capability") or {}
    histogram = profile.get(PROFILE_LABEL_HISTOGRAM)
    try:
        return ClientInfo(client_id, num_samples=int(profile[PROFILE_NUM_SAMPLES]),
                          label_histogram=tuple(histogram) if histogram is not None else None,
                          compute_speed=capability.get(CAPABILITY_COMPUTE_SPEED), bandwidth=capability.get(CAPABILITY_BANDWIDTH))
    except (KeyError, TypeError, ValueError):
        return None
