"""OpenFHE's multiparty (threshold, n-of-n) CKKS for the cnn update: what one client would send and spend.

Not part of the project's Python: every openfhe wheel on PyPI carries a CPython 3.10 (1.2.3.0.24.4: 3.12)
extension under a py3-none-any tag, so it does not import on 3.11. Run it in a 3.10 venv:

    python3.10 -m venv /tmp/venv310 && /tmp/venv310/bin/pip install numpy openfhe==1.6.1.0.22.4
    /tmp/venv310/bin/python benchmarks/he_openfhe_probe.py [scaling_mod_bits=40] [multiplicative_depth=0]

Three parties make a joint public key (KeyGen, MultipartyKeyGen), each encrypts one chunk of N/2 slots,
EvalAddMany sums them, MultipartyDecryptLead/Main make the partial decryptions and MultipartyDecryptFusion
joins them. Timings per ciphertext, extrapolated to the 1,663,370 parameters (no noise flooding of the
partial decryptions: enabling it, as threshold CKKS needs against key-recovery attacks, only grows the moduli).
"""

import sys
import time
from typing import Any

import numpy as np
import openfhe as o  # type: ignore[import-not-found]

P = 1_663_370
PARTIES = 3
ROUNDS = 20


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def main() -> None:
    params = o.CCParamsCKKSRNS()
    params.SetMultiplicativeDepth(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    params.SetScalingModSize(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    params.SetFirstModSize(60)
    params.SetSecurityLevel(o.SecurityLevel.HEStd_128_classic)
    params.SetKeySwitchTechnique(o.KeySwitchTechnique.BV)
    cc = o.GenCryptoContext(params)
    for f in (o.PKESchemeFeature.PKE, o.PKESchemeFeature.KEYSWITCH, o.PKESchemeFeature.LEVELEDSHE,
              o.PKESchemeFeature.MULTIPARTY, o.PKESchemeFeature.ADVANCEDSHE):
        cc.Enable(f)
    slots = cc.GetRingDimension() // 2
    nct = -(-P // slots)
    print("ring", cc.GetRingDimension(), "slots", slots, "ciphertexts", nct)
    t0 = time.process_time()
    kps = [cc.KeyGen()]
    for _ in range(1, PARTIES):
        kps.append(cc.MultipartyKeyGen(kps[-1].publicKey))
    pk = kps[-1].publicKey
    print("keygen cpu per party", (time.process_time() - t0) / PARTIES, "joint pk bytes", len(o.Serialize(pk, o.BINARY)))
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 0.01, slots) for _ in range(PARTIES)]
    t0 = time.process_time()
    for _ in range(ROUNDS):
        ct = cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(xs[0].tolist()))
    enc = (time.process_time() - t0) / ROUNDS
    size = len(o.Serialize(ct, o.BINARY))
    cts = [cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(x.tolist())) for x in xs]
    total, add = _timed(cc.EvalAddMany, cts)
    t0 = time.process_time()
    parts = [cc.MultipartyDecryptLead([total], kps[0].secretKey)[0]]
    parts += [cc.MultipartyDecryptMain([total], kp.secretKey)[0] for kp in kps[1:]]
    pdec = (time.process_time() - t0) / PARTIES
    psize = len(o.Serialize(parts[1], o.BINARY))
    plain, fusion = _timed(cc.MultipartyDecryptFusion, parts)
    plain.SetLength(slots)
    err = float(np.abs(np.array(plain.GetRealPackedValue()) - sum(xs)).max())
    print(f"per ciphertext: encrypt {enc:.4f} s, {size} bytes; EvalAddMany of {PARTIES}: {add:.4f} s; partial decryption "
          f"{pdec:.4f} s, {psize} bytes; fusion {fusion:.4f} s; max error {err:.2e}")
    print(f"per client, whole cnn: {nct} ciphertexts, upload {nct * size / 1e6:.1f} MB, encrypt CPU {nct * enc:.1f} s; "
          f"partial decryption {nct * pdec:.1f} s CPU and {nct * psize / 1e6:.1f} MB more")


if __name__ == "__main__":
    main()
