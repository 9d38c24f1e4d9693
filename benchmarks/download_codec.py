"""Model download in float16 instead of float32: bytes, server and client costs, and the accuracy it keeps.

The synchronous server packs and Fernet-encrypts each model version once (fl_server/rest/sync_driver.py); every
selected client downloads it, decrypts it and decodes it before it can train. This measures that path for the
demo's cnn after a little training (so the weights are not the initialisation's), in float32 ("none", what is
sent today) and float16: bytes on the wire, the server's pack + encrypt once, the client's decrypt + decode, and
the test accuracy of the model each client would start from. What it does not measure: a whole federation
trained from float16 starting points (each round's delta is computed against the rounded start, so the
rounding does not accumulate in the server's float32 model; see the README).

    PYTHONPATH=$PWD python benchmarks/download_codec.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from cryptography.fernet import Fernet

from fl_common.config import config_from_dict
from fl_common.crypto import Envelope
from fl_common.data import load_dataset
from fl_common.models import model_from_config
from fl_common.protocol import TrainInstructions
from fl_common.tensors import wire
from fl_common.training import LocalTrainer
from fl_server.rest.demo import DEMO_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "benchmarks" / "results" / "fast_rounds" / "download_codec.json"
REPEATS = 5


def main() -> None:
    torch.set_num_threads(1)
    cfg = config_from_dict({**DEMO_DEFAULTS})
    train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, seed=cfg.seed)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, seed=cfg.seed)
    model = model_from_config(cfg, test.input_shape, test.num_classes)
    trainer = LocalTrainer(model)
    start = trainer.vector()
    instr = TrainInstructions(round=1, epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9, seed=1)
    update = trainer.train(start, train.x[:3000], train.y[:3000], instr)
    vector = start + update.delta
    x, y = test.x[:2000], test.y[:2000]
    out: dict[str, dict[str, float]] = {}
    for codec in ("none", "float16"):
        pack_s, open_s = [], []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            packed = wire.encode_update(vector, codec, cfg.wire_compression, meta={"version": 1})
            key = Fernet.generate_key()
            body = Envelope(key).seal(packed)
            t1 = time.perf_counter()
            received, _ = wire.decode_update(Envelope(key).open(body), vector.numel(), max_bytes=2**34)
            t2 = time.perf_counter()
            pack_s.append(t1 - t0)
            open_s.append(t2 - t1)
        result = trainer.evaluate(received, x, y)
        out[codec] = {"bytes_encrypted": len(body), "server_pack_encrypt_s": statistics.median(pack_s),
                      "client_decrypt_decode_s": statistics.median(open_s), "test_accuracy": result.accuracy,
                      "test_loss": result.loss, "max_abs_weight_error": float((received - vector).abs().max())}
    report = {"model": cfg.model_type, "numel": vector.numel(), "codecs": out, "repeats": REPEATS,
              "note": "2 shared CPU cores (load average in load_average)", "load_average": list(__import__("os").getloadavg()),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    DEST.parent.mkdir(parents=True, exist_ok=True)
    DEST.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
