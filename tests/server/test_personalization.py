"""Per-client held-out splits, personalized fine-tuning and the local-only baseline (simulation).

Small seeded runs on the synthetic task with a small MLP: real training, seconds each.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.data.partition import partition
from fl_server.__main__ import main
from fl_server.simulation import Simulation
from fl_server.simulation.base import changed_config_keys
from fl_server.simulation.local_only import LocalOnlyBaseline
from fl_server.simulation.personalization import distribution, gain_distribution, split_client_data, split_partitions

SYNTH = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 10, "client_selection_ratio": 0.5,
         "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 2000,
         "max_test_samples": 500, "differential_privacy": False, "secure_aggregation": False, "compression": False,
         "seed": 3, "workers": 0}
#: strongly non-IID: two label shards per client, so each client sees about two classes
NON_IID = {**SYNTH, "data_distribution": "shards", "shards_per_client": 2}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------- the split
def test_split_is_deterministic_disjoint_and_covers_the_partition() -> None:
    parts = partition(np.arange(5000) % 10, 20, "dirichlet", seed=1, alpha=0.3)
    for cid, idx in enumerate(parts):
        train, held = split_client_data(idx, 0.2, seed=7, client=cid)
        again = split_client_data(idx, 0.2, seed=7, client=cid)
        assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])  # seeded by (seed, client) only
        assert np.intersect1d(train, held).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, held])), np.sort(idx))
        assert len(held) == min(len(idx) - 1, max(1, round(0.2 * len(idx)))) and len(train) >= 1
        assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    # another seed or another client draws another split; the same client alone reproduces its own
    idx = parts[0]
    assert not np.array_equal(split_client_data(idx, 0.2, 7, 0)[1], split_client_data(idx, 0.2, 8, 0)[1])
    assert not np.array_equal(split_client_data(idx, 0.2, 7, 0)[1], split_client_data(idx, 0.2, 7, 1)[1])
    _trains, helds = split_partitions(parts, 0.2, 7)
    assert all(np.array_equal(helds[c], split_client_data(parts[c], 0.2, 7, c)[1]) for c in range(len(parts)))
    # fraction 0: the partitions themselves, and no held-out part
    same, empty = split_partitions(parts, 0.0, 7)
    assert all(a is b for a, b in zip(same, parts, strict=False)) and all(e.size == 0 for e in empty)
    # tiny clients still keep one sample on each side; a one-sample client cannot be split
    assert [len(p) for p in split_client_data(np.array([4, 9]), 0.01, 0, 0)] == [1, 1]
    with pytest.raises(ConfigError, match="client 3 holds 1 sample"):
        split_client_data(np.array([5]), 0.2, 0, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_client_data(idx, 1.0, 0, 0)


def test_distribution_and_gain_summaries() -> None:
    d = distribution([0.5, 0.1, 0.9, 0.3])
    assert d["clients"] == 4 and d["mean"] == pytest.approx(0.45) and d["median"] == pytest.approx(0.4)
    assert d["worst_10pct"] == pytest.approx(0.1) and (d["min"], d["max"]) == (0.1, 0.9)
    g = gain_distribution([0.6, 0.2, 0.9], [0.5, 0.4, 0.9])
    assert g["mean"] == pytest.approx(-0.1 / 3) and g["clients_improved"] == 1 and g["clients_worse"] == 1
    assert distribution([]) == {"clients": 0}


# ----------------------------------------------------------------------------- federated driver
def test_fraction_zero_leaves_the_run_unchanged(tmp_path: Path) -> None:
    with Simulation(SYNTH, progress=False) as plain:
        a = plain.train()
        per_a = plain.evaluate_clients()
        summary_a = plain.client_accuracy_summary(per_a)
        with pytest.raises(ConfigError, match="client_test_fraction"):
            plain.evaluate_client_models()  # nothing held out: nothing to compare on
    with Simulation({**SYNTH, "client_test_fraction": 0.0}, progress=False) as keyed:
        b = keyed.train()
        per_b = keyed.evaluate_clients()
        assert torch.equal(plain.coordinator.global_vector, keyed.coordinator.global_vector)
    strip = lambda h: [(r.round, r.test_accuracy, r.test_loss, r.train_loss, r.clients, r.bytes) for r in h]
    assert strip(a) == strip(b)
    assert per_a == per_b and sum(r["num_samples"] for r in per_a) == 2000  # measured on all the training data
    assert summary_a["measure"] == "global model on each client's training data"


def test_heldout_split_trains_on_the_train_parts_only(tmp_path: Path) -> None:
    with Simulation({**SYNTH, "client_test_fraction": 0.25, "num_rounds": 1}, tmp_path / "run", progress=False) as sim:
        assert sum(map(len, sim.partitions)) == 1500 and sum(map(len, sim.heldout)) == 500
        assert sim.coordinator._client_sizes == {c: len(p) for c, p in enumerate(sim.partitions)}
        sim.train()
        per = sim.evaluate_clients()
        assert [r["num_samples"] for r in per] == [len(h) for h in sim.heldout]
        summary = sim.save_results()
    assert summary["client_accuracy"]["measure"].startswith("global model on each client's held-out part")
    assert "personalization" not in summary  # neither fine-tuning nor local-only configured
    rows = _rows(tmp_path / "run" / "client_accuracy.csv")
    assert len(rows) == 10 and "held-out part" in rows[0]["measure"]
    hist = _rows(tmp_path / "run" / "label_histograms.csv")
    assert sum(int(r["total"]) for r in hist) == 1500  # what the federation trains on


def test_finetuning_improves_heldout_accuracy_on_non_iid_clients(tmp_path: Path) -> None:
    cfg = {**NON_IID, "num_rounds": 3, "client_test_fraction": 0.25, "finetune_epochs": 2, "local_only_epochs": 3}
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        sim.train()
        models = sim.evaluate_client_models()
        summary = sim.save_results()
    assert sorted(models) == list(range(10))
    assert all(m["accuracy"] == m["finetuned_accuracy"] and m["heldout_samples"] == 50 for m in models.values())
    p = summary["personalization"]
    assert p["clients"] == 10 and p["finetune_epochs"] == 2 and p["local_only_epochs"] == 3
    assert p["measure"].startswith("accuracy on each client's held-out part")
    # two classes per client: the global model serves each client badly, one or two local epochs fix that
    assert p["finetuned"]["mean"] > p["federated"]["mean"] + 0.2, p
    assert p["gain_finetuned_vs_federated"]["mean"] == pytest.approx(p["finetuned"]["mean"] - p["federated"]["mean"])
    assert p["gain_finetuned_vs_federated"]["clients_improved"] >= 8
    assert p["local_only"]["mean"] > p["federated"]["mean"]
    for key in ("mean", "median", "worst_10pct"):
        assert 0.0 <= p["finetuned"][key] <= 1.0
    rows = _rows(tmp_path / "run" / "personalization.csv")
    assert len(rows) == 10
    assert {"federated_accuracy", "finetuned_accuracy", "local_only_accuracy", "gain_finetuned_vs_federated",
            "gain_finetuned_vs_local_only", "measure"} <= set(rows[0])
    for r in rows:
        assert float(r["gain_finetuned_vs_federated"]) == pytest.approx(float(r["finetuned_accuracy"]) - float(r["federated_accuracy"]))
        assert float(r["federated_accuracy"]) == pytest.approx(models[int(r["client"])]["federated_accuracy"])
    # client_accuracy.csv keeps the global model's per-client accuracy, on the same held-out parts
    acc = _rows(tmp_path / "run" / "client_accuracy.csv")
    assert [float(a["accuracy"]) for a in acc] == pytest.approx([float(r["federated_accuracy"]) for r in rows])
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["personalization"]["finetuned"]["mean"] == pytest.approx(p["finetuned"]["mean"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Personalization per client" in report and "fine-tuned" in report and "local-only" in report

    # the local-only numbers of the federated run are the standalone baseline's, client by client
    base = LocalOnlyBaseline(config_from_dict(cfg | {"finetune_epochs": 0}), progress=False)
    alone = base.train()
    assert [r["local_only_accuracy"] for r in alone] == pytest.approx([models[c]["local_only_accuracy"] for c in range(10)])


def test_old_checkpoints_without_the_new_keys_still_resume() -> None:
    current = config_from_dict(SYNTH).to_dict()
    stored = {k: v for k, v in current.items() if k not in ("client_test_fraction", "finetune_epochs", "local_only_epochs")}
    assert changed_config_keys(stored, current) == []
    assert changed_config_keys(stored, {**current, "client_test_fraction": 0.2}) == ["client_test_fraction"]
    # measuring more after the last round is allowed on resume; changing the data split is not
    assert changed_config_keys(current, {**current, "finetune_epochs": 2, "local_only_epochs": 5}) == []


# ------------------------------------------------------------------------------------ local-only
def test_local_only_cli_reports_per_client_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "local"
    sets = {**NON_IID, "workers": 2, "local_only_epochs": 2, "client_test_fraction": 0.2}
    argv = ["--log-level", "WARNING", "simulate", "--local-only", "--no-progress", "--output", str(out)]
    argv += [f"--set={k}={v}" for k, v in sets.items()]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "local_only" and summary["rounds_completed"] == 1 and summary["total_bytes"] == 0
    rows = _rows(out / "personalization.csv")
    assert [int(r["client"]) for r in rows] == list(range(10))
    test_accs = [float(r["local_only_test_accuracy"]) for r in rows]
    held_accs = [float(r["local_only_accuracy"]) for r in rows]
    assert summary["final_accuracy"] == pytest.approx(np.mean(test_accs)) == pytest.approx(printed["final_accuracy"])
    assert summary["test_set_accuracy"]["mean"] == pytest.approx(np.mean(test_accs))
    assert summary["client_accuracy"]["mean"] == pytest.approx(np.mean(held_accs)) == pytest.approx(printed["client_mean"])
    assert summary["client_accuracy"]["worst_10pct"] == pytest.approx(min(held_accs))  # 10 clients: the worst one
    assert "held-out part" in summary["client_accuracy"]["measure"]
    # a client that knows two classes scores well on its own held-out data and badly on all ten classes
    assert summary["client_accuracy"]["mean"] > 0.6 > 0.4 > summary["test_set_accuracy"]["mean"]
    hist = _rows(out / "history.csv")
    assert len(hist) == 1 and float(hist[0]["test_accuracy"]) == pytest.approx(np.mean(test_accs))
    assert len(_rows(out / "client_accuracy.csv")) == 10
    report = (out / "report.md").read_text()
    assert "local-only baseline" in report and "Personalization per client" in report
    assert not (out / "model.pt").exists()


def test_local_only_without_heldout_part_measures_on_the_test_set() -> None:
    base = LocalOnlyBaseline(config_from_dict({**SYNTH, "local_only_epochs": 1, "num_clients": 4}), progress=False)
    rows = base.train()
    assert len(rows) == 4 and all("local_only_accuracy" not in r for r in rows)
    assert sum(r["train_samples"] for r in rows) == 2000  # all local data trains
    summary = base.summary()
    assert summary["client_accuracy"]["measure"] == "each client's local-only model on the global test set"
    assert summary["client_accuracy"]["mean"] == pytest.approx(summary["test_set_accuracy"]["mean"])


def test_local_only_test_subsets_are_per_client_and_seeded() -> None:
    cfg = config_from_dict({**SYNTH, "local_only_epochs": 1, "num_clients": 4, "local_only_test_samples": 100})
    base = LocalOnlyBaseline(cfg, progress=False)
    xs = [base.client_test_set(c) for c in range(4)]
    assert all(len(y) == 100 for _, y in xs)
    assert not torch.equal(xs[0][0], xs[1][0]) and torch.equal(xs[2][0], base.client_test_set(2)[0])
    rows = base.train()
    summary = base.summary()
    assert "100 of its 500 samples" in summary["test_set_accuracy"]["measure"]
    assert summary["final_accuracy"] == pytest.approx(np.mean([r["local_only_test_accuracy"] for r in rows]))
    # more test samples than there are: the whole test set
    whole = LocalOnlyBaseline(config_from_dict({**SYNTH, "local_only_epochs": 1, "local_only_test_samples": 10**6}), progress=False)
    assert len(whole.client_test_set(0)[1]) == 500 and whole.test_set_measure == "each client's local-only model on the global test set"


# -------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("values, message", [
    ({"client_test_fraction": 1.0}, "leave nothing to train on"),
    ({"client_test_fraction": 1.5}, "client_test_fraction"),
    ({"client_test_fraction": -0.1}, "client_test_fraction"),
    ({"finetune_epochs": 1}, "only be evaluated on the data it was fine-tuned on"),
    ({"finetune_epochs": -1}, "finetune_epochs"),
    ({"local_only_epochs": -2}, "local_only_epochs"),
    ({"training_mode": "async", "client_test_fraction": 0.2}, "training_mode 'sync' only"),
    ({"local_only_test_samples": 0}, "local_only_test_samples"),
])
def test_bad_values_are_refused_with_a_reason(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**SYNTH, **values})


def test_local_only_epochs_in_a_federated_run_needs_a_heldout_part() -> None:
    with pytest.raises(ConfigError, match="local_only_epochs.*client_test_fraction is 0"):
        Simulation({**SYNTH, "local_only_epochs": 2}, progress=False)
    with pytest.raises(ConfigError, match="applies to simulate --local-only"):
        Simulation({**SYNTH, "client_test_fraction": 0.2, "local_only_test_samples": 100}, progress=False)


@pytest.mark.parametrize("extra, message", [
    ([], "local_only_epochs epochs, which is 0"),
    (["--set=local_only_epochs=1", "--set=differential_privacy=true"], "without differential privacy"),
    (["--set=local_only_epochs=1", "--set=client_test_fraction=0.2", "--set=finetune_epochs=1"], "no federated model to fine-tune"),
    (["--set=local_only_epochs=1", "--centralized"], "cannot be combined with --centralized"),
])
def test_local_only_cli_refusals(extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [f"--set={k}={v}" for k, v in SYNTH.items()]
    assert main(["--log-level", "ERROR", "simulate", "--local-only", "--output", str(tmp_path / "o"), *sets, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_grid_lists_the_local_only_baselines() -> None:
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import run_grid
    finally:
        sys.path.remove(str(root / "benchmarks"))
    _, common, experiments = run_grid.load_grid(root / "benchmarks" / "grids" / "algorithms.yaml")
    by_name = {e["name"]: e for e in experiments}
    for name in ("local_only_iid", "local_only_dirichlet0.5", "local_only_dirichlet0.1"):
        exp = by_name[name]
        assert exp["local_only"] is True
        config_from_dict({**run_grid.yaml.safe_load((root / common["config"]).read_text()), **exp["set"]})  # valid
