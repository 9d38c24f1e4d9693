"""What a run's (epsilon, delta) means, in the words users read: the demo's last line, the report, the README.

Why one module: a number like "(epsilon, delta) = (1.99, 1e-05)" says nothing by itself. Sample-level
DP here protects one *record* of one client, accounted per client, and the figure printed is the
largest over the clients; per-client calibration reads each client's record count, which is
therefore treated as public; the label histograms some selection policies read are a second,
separate release. Every place that prints the number builds its sentence here, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GUARANTEES", "distributed_noise_note", "guarantee", "label_histogram_note", "noise_multiplier_range", "statement_lines"]

GUARANTEES = {
    "sample": ("record-level: adding or removing any one training record of any one client changes the probability of "
               "anything the server (or anyone holding the released models) could observe by at most a factor e^epsilon "
               "plus delta, over the whole run; accounted per client, the figure is the maximum over clients; each "
               "client's record count is treated as public (per-client noise calibration reads it). It does not bound "
               "what can be learned about a client as a whole"),
    "client": ("client-level: whether any one client took part with all of its data or not changes the probability of "
               "any released model by at most a factor e^epsilon plus delta, over the whole run; clients are "
               "Poisson-sampled at q = clients_per_round / num_clients per round, as the accountant assumes"),
}


def guarantee(mode: str | None) -> str:
    """The meaning of the (epsilon, delta) of a DP granularity ('sample' or 'client')."""
    return GUARANTEES.get(str(mode), f"granularity {mode!r}: no statement on record")


def noise_multiplier_range(privacy: Mapping[str, Any]) -> tuple[float, float] | None:
    """(smallest, largest) sigma under per-client calibration, from the privacy block; None otherwise."""
    by_size = privacy.get("noise_multiplier_by_size")
    if privacy.get("noise_calibration") != "per_client" or not isinstance(by_size, Sequence) or not by_size:
        return None
    sigmas = [float(pair[1]) for pair in by_size]
    return min(sigmas), max(sigmas)


def distributed_noise_note(privacy: Mapping[str, Any]) -> str | None:
    """What sample-level distributed noise assumes (the privacy block says ``noise: distributed``), or None."""
    shares = privacy.get("noise_shares")
    if privacy.get("noise") != "distributed" or not isinstance(shares, int):
        return None
    return (f"distributed: each selected client added a 1/{shares} share of it and the server unmasked only sums of at "
            f"least {shares} masked updates, so the epsilon holds while the masking does (a server that follows the "
            f"protocol) and the clients in each sum added their shares; a client colluding with the server removes its "
            f"own share from that protection")


def label_histogram_note(label_histogram_epsilon: float | None) -> str | None:
    """The second release some selection policies read (stratified by label), or None when there is none."""
    if label_histogram_epsilon is None:
        return None
    return (f"each client also released its label histogram once, with Laplace noise (pure epsilon = "
            f"{label_histogram_epsilon:g}); by basic composition a record's total is (epsilon + "
            f"{label_histogram_epsilon:g}, delta)")


def statement_lines(privacy: Mapping[str, Any], label_histogram_epsilon: float | None) -> list[str]:
    """The sentences that say what the recorded epsilon covers (report bullets, README examples)."""
    lines = [f"Meaning: {guarantee(privacy.get('mode'))}."]
    sigmas = noise_multiplier_range(privacy)
    if sigmas is not None:
        lines.append(f"Noise multiplier per client (calibrated for each client's sampling rate and steps): "
                     f"{sigmas[0]:.4g} to {sigmas[1]:.4g}.")
    distributed = distributed_noise_note(privacy)
    if distributed is not None:
        lines.append(f"Noise: {distributed}.")
    note = label_histogram_note(label_histogram_epsilon)
    if note is not None:
        lines.append(note[0].upper() + note[1:] + ".")
    return lines
