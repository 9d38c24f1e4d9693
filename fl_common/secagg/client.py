"""The client side of one SecAgg / SecAgg+ round, as a transport-free state machine.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning"),
with the neighbour graph of Bell et al. 2020 (SecAgg+). One object per client per round; its
methods are called in order, each consuming what the server relayed and returning what to send:

    client = SecAggClient(params, index, identity)
    adv    = client.advertise()                      # phase 0
    shares = client.share_keys(roster)               # phase 1
    masked = client.masked_input(bundle, plain)      # phase 2
    signed = client.consistency_check(check)         # phase 3 (against an active server)
    resp   = client.unmask(request)                  # phase 4

Whatever the server sends is checked before it is used, and the client *refuses*
(:class:`SecAggRefused`) rather than continue in a way that could expose its input: a roster
with a bad signature, a substituted own key, one verifying key for two members or (with pinned
keys) a neighbour whose key is not pinned, a threshold that is not a strict majority, a
bundle that withholds a neighbour's ciphertext, a consistency check or unmask request that names
a client both as survivor and as dropped (revealing both shares of one client reveals its input),
an unmask request for any set other than the one it signed, or one carrying fewer than t valid
signatures on that set from its own share holders (itself and its neighbours), a request for the
shares twice, or one with fewer than t survivors among its own neighbours.

Why the consistency check (Bonawitz et al. 2017, the active-adversary variant): a lying server
can tell some of a target's share holders "the target is alive" (they reveal shares of its
self-mask seed) and others "the target dropped" (they reveal shares of its mask key). Each
honest client here signs one set per attempt and reveals only for a set that at least t of its
share holders signed, so the honest holders that reveal for "alive" and those that reveal for
"dropped" are disjoint and each group needs t - c signatures of its own from honest clients,
c the corrupt holders. Both secrets of the target are out of reach while

    2t > h + c        (h = k + 1 share holders per client, c colluding among them)

i.e. the round tolerates c = 2t - h - 1 corrupt holders per neighbourhood
(:meth:`SecAggParams.tolerated_corrupt`; in the complete graph a fraction (2t - n - 1)/n of all
clients: about a third at t = floor(2n/3) + 1, Bonawitz et al.'s choice). The threshold is
what carries this bound; the signed set adds that every honest client that reveals acted on a
set t of its holders endorsed, and that no request can be replayed into another round or attempt.

Secrets (the two private keys, b_u, the shares held for neighbours) never appear in a repr or
an exception message, and are dropped once the client has answered the unmask request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Set
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_common.crypto.keys import KeyAgreementError, KeyPair, x25519_shared_secret
from fl_common.secagg.auth import ED25519, HMAC_SHA256, SigningIdentity, Verifier, check_server_tag
from fl_common.secagg.encoding import PlainInput, encode_input, pack
from fl_common.secagg.graph import build_graph
from fl_common.secagg.masks import mask_words
from fl_common.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    MaskedInput,
    RosterEntry,
    RosterMessage,
    SecAggParams,
    SecAggRefused,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.precompute import MaskingJob, MaskMaterial, MaskPrecompute
from fl_common.secagg.prg import SEED_LEN
from fl_common.secagg.shamir import Share, ShareError, split_secret

__all__ = ["ClientPhase", "SecAggClient", "self_seed_commitment", "share_key", "share_associated_data"]


class ClientPhase(str, Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    CHECKED = "checked"
    DONE = "done"


def self_seed_commitment(params_digest: bytes, index: int, seed: bytes) -> bytes:
    """SHA-256 commitment to b_u (sent with the shares): lets the server check a rebuilt seed."""
    return hashlib.sha256(b"fl-hub/v1/secagg/self-seed|" + params_digest + index.to_bytes(4, "big") + seed).digest()


def share_key(own: KeyPair, peer_c_pk: bytes, u: int, v: int, params_digest: bytes) -> bytes:
    """AES-256-GCM key for the pair {u, v}: HKDF over X25519(c_u, c_v), bound to the pair and the round."""
    lo, hi = min(u, v), max(u, v)
    secret = x25519_shared_secret(own.private_key, peer_c_pk)
    info = b"fl-hub/v1/secagg/share-key|" + params_digest + lo.to_bytes(4, "big") + hi.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def share_associated_data(params_digest: bytes, sender: int, recipient: int) -> bytes:
    """AEAD associated data: a ciphertext only opens for this sender -> recipient in this round."""
    return b"fl-hub/v1/secagg/share-ct|" + params_digest + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def _trusted_keys(keys: Mapping[str, bytes] | Set[bytes] | None) -> dict[str, bytes] | frozenset[bytes] | None:
    """A private copy of the caller's pinned keys (the caller may mutate its own); a set must hold raw
    32-byte keys, so that a typo fails here rather than as a refused roster mid-round."""
    if keys is None:
        return None
    if isinstance(keys, Mapping):
        return {str(cid): bytes(k) for cid, k in keys.items()}
    if isinstance(keys, Set):
        pinned = frozenset(bytes(k) for k in keys)
        if any(len(k) != 32 for k in pinned):
            raise ValueError("a pinned Ed25519 verifying key is exactly 32 bytes")
        return pinned
    raise TypeError("trusted_verify_keys must be a Mapping (client id -> key) or a Set of keys")


class SecAggClient:
    def __init__(self, params: SecAggParams, index: int, identity: SigningIdentity, *,
                 trusted_verify_keys: Mapping[str, bytes] | Set[bytes] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        """``identity`` signs this client's messages (its scheme must be the round's ``params.auth``).

        ``trusted_verify_keys`` (from a PKI or pinned out of band) makes the client check neighbours'
        signatures against keys the server cannot substitute; without it the verifying keys in the
        roster are trusted (see auth.py). Two forms:

        * a Mapping, driver client id -> Ed25519 verifying key: each neighbour's signature is checked
          against the key of the id the round's parameters give its index;
        * a Set of raw 32-byte verifying keys, for drivers whose ids are not known in advance (the
          REST server assigns ``c-<hex>`` at registration): each neighbour's roster entry must carry
          a key in the set, and its signature is checked against that key. This is as strong as the
          Mapping where it matters: the signed bytes bind the round's parameter digest (session,
          round, client ids) and the signer's index, so the server can neither replay a trusted
          client's advertisement from another round nor reuse one trusted key for several members
          (that key never signed the other indices; a repeated key is refused outright). What the
          server *can* do is seat trusted clients at indices whose ids are not theirs: harmless,
          since every key masked with still belongs to a pinned client, never to the server.

        Either form is only meaningful in an Ed25519 round: with pinned keys a round that signs with
        HMAC (whose keys the server holds) is refused rather than silently unpinned.
        ``rng`` drives only the stochastic rounding (not a secret; seed it for reproducible runs)."""
        params.validate()
        if index not in params.indices:
            raise ValueError(f"index {index} is not in this round (1..{params.n})")
        if identity.scheme != params.auth:
            raise SecAggRefused(f"the round signs with {params.auth}, this client's identity is {identity.scheme}")
        if trusted_verify_keys is not None and params.auth != ED25519:
            raise SecAggRefused(f"this client pins Ed25519 verifying keys but the round signs with {params.auth}",
                                "bad_params")
        self.params = params
        self.index = index
        self._identity = identity
        self._trusted: dict[str, bytes] | frozenset[bytes] | None = _trusted_keys(trusted_verify_keys)
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._digest = params.digest()
        self._c = KeyPair.generate()
        self._s = KeyPair.generate()
        self._b: bytes | None = None
        self._own_b_share: Share | None = None
        self.phase = ClientPhase.NEW
        self.neighbours: frozenset[int] = frozenset()
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}  # v -> (c_pk, s_pk) from the verified roster
        self._peer_verify: dict[int, bytes] = {}  # v -> the Ed25519 key v's roster signature was checked against
        self._signed_set: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # the one set this client signed
        self._held: dict[int, tuple[Share, Share]] = {}  # v -> (share of b_v, share of s_sk_v), held for v
        self._share_survivors: frozenset[int] = frozenset()
        self._masked_with: frozenset[int] | None = None  # the neighbours an opened bundle says to mask with
        #: senders whose ciphertext failed authentication (their shares were never used)
        self.rejected: tuple[int, ...] = ()
        #: did the secagg clip change this client's vectors (set in masked_input)
        self.clipped = False
        #: the masks expanded early (precompute.py; set by the caller once keys are shared), None: expand at upload
        self.precomputed: MaskPrecompute | None = None

    def __repr__(self) -> str:
        return f"SecAggClient(round={self.params.round}, index={self.index}, phase={self.phase.value})"

    def _expect(self, phase: ClientPhase, action: str) -> None:
        if self.phase != phase:
            raise SecAggRefused(f"client {self.index} cannot {action} in phase {self.phase.value}", "wrong_phase")

    # ------------------------------------------------------------------ phase 0
    def advertise(self) -> AdvertiseKeys:
        self._expect(ClientPhase.NEW, "advertise keys")
        c_pk, s_pk = self._c.public_bytes, self._s.public_bytes
        sig = self._identity.sign(AdvertiseKeys.signing_bytes(self._digest, self.index, c_pk, s_pk))
        self.phase = ClientPhase.ADVERTISED
        return AdvertiseKeys(self.index, c_pk, s_pk, sig)

    # ------------------------------------------------------------------ phase 1
    def _check_roster(self, roster: RosterMessage) -> None:
        p = self.params
        members = roster.members
        if list(members) != sorted(set(members)) or not set(members) <= set(p.indices):
            raise SecAggRefused("the roster's members are not distinct round indices in order", "bad_roster")
        if self.index not in members:
            raise SecAggRefused("the roster does not list this client", "bad_roster")
        if len(members) < p.threshold:
            raise SecAggRefused(f"the roster has {len(members)} clients, fewer than the threshold {p.threshold}", "bad_roster")
        keys = [e.c_pk for e in roster.entries] + [e.s_pk for e in roster.entries]
        if len(set(keys)) != len(keys):
            raise SecAggRefused("the roster repeats a public key (a substituted or replayed key)", "bad_roster")
        if p.auth == HMAC_SHA256 and not check_server_tag(self._identity, roster.digest(self._digest), roster.server_tag):
            raise SecAggRefused("the roster's server tag does not verify", "bad_roster_signature")
        if p.auth == ED25519:
            self._check_distinct_verify_keys(roster)
        for e in roster.entries:
            if e.index == self.index:
                if (e.c_pk, e.s_pk) != (self._c.public_bytes, self._s.public_bytes):
                    raise SecAggRefused("the roster carries different keys for this client (key substitution)", "bad_roster")
                if p.auth == ED25519 and e.verify_key != self._identity.verify_key:
                    raise SecAggRefused("the roster carries a different verifying key for this client", "bad_roster")
                continue
            if p.auth != ED25519:
                continue  # HMAC: peers cannot check each other; the server tag vouched for the roster
            key = self._verify_key_for(e)
            self._peer_verify[e.index] = key
            try:
                ok = Verifier(ED25519, key).verify(AdvertiseKeys.signing_bytes(self._digest, e.index, e.c_pk, e.s_pk),
                                                   e.signature)
            except ValueError:
                ok = False
            if not ok:
                raise SecAggRefused(f"the advertised keys of client {e.index} do not carry its signature", "bad_roster_signature")

    def _verify_key_for(self, e: RosterEntry) -> bytes:
        """The key a neighbour's signature is checked against: the roster's (no pinning), the pinned key of
        its client id (Mapping), or the roster's key once it is known to be pinned (Set)."""
        if self._trusted is None:
            return e.verify_key
        if isinstance(self._trusted, frozenset):
            if e.verify_key not in self._trusted:
                raise SecAggRefused(f"no trusted verifying key for client {e.index}: the roster carries a key that is not "
                                    "pinned", "bad_roster_signature")
            return e.verify_key
        cid = self.params.client_ids[e.index - 1]
        if cid not in self._trusted:
            raise SecAggRefused(f"no trusted verifying key for client {cid}", "bad_roster_signature")
        return self._trusted[cid]

    def _check_distinct_verify_keys(self, roster: RosterMessage) -> None:
        """One long-term identity is one member: a key the roster carries twice (or, with a Mapping, one pinned
        for two members) is a server counting one client twice, refused whichever form of pinning is used."""
        lists = [[(e.index, e.verify_key) for e in roster.entries if e.verify_key]]  # (an empty key fails its signature check)
        if isinstance(self._trusted, dict):
            ids = self.params.client_ids
            lists.append([(e.index, self._identity.verify_key if e.index == self.index else self._trusted[ids[e.index - 1]])
                          for e in roster.entries if e.index == self.index or ids[e.index - 1] in self._trusted])
        for pairs in lists:
            first: dict[bytes, int] = {}
            for index, key in pairs:
                if key in first:
                    raise SecAggRefused(f"the roster gives clients {first[key]} and {index} the same verifying key",
                                        "bad_roster")
                first[key] = index

    def share_keys(self, roster: RosterMessage) -> ShareKeys:
        """Verify the roster, then Shamir-share b_u and s_sk_u among (neighbours + self), each pair of
        shares encrypted for its holder."""
        self._expect(ClientPhase.ADVERTISED, "share keys")
        self._check_roster(roster)
        p = self.params
        members = roster.members
        graph = build_graph(members, p.degree, roster.graph_seed(self._digest))
        self.neighbours = graph[self.index]
        self._peer_keys = {e.index: (e.c_pk, e.s_pk) for e in roster.entries if e.index in self.neighbours}
        holders = sorted(self.neighbours | {self.index})
        if len(holders) < p.threshold:
            raise SecAggRefused(f"{len(holders)} share holders, fewer than the threshold {p.threshold}", "too_few_neighbours")
        self._b = secrets.token_bytes(SEED_LEN)
        b_shares = split_secret(self._b, p.threshold, holders)
        s_shares = split_secret(self._s.private_bytes(), p.threshold, holders)
        self._own_b_share = b_shares[self.index]
        cts = []
        for v in sorted(self.neighbours):
            try:
                key = share_key(self._c, self._peer_keys[v][0], self.index, v, self._digest)
            except KeyAgreementError:
                raise SecAggRefused(f"client {v}'s encryption key is degenerate", "bad_roster") from None
            plaintext = self.index.to_bytes(4, "big") + v.to_bytes(4, "big") + b_shares[v].to_bytes() + s_shares[v].to_bytes()
            nonce = secrets.token_bytes(12)
            cts.append((v, nonce + AESGCM(key).encrypt(nonce, plaintext, share_associated_data(self._digest, self.index, v))))
        commitment = self_seed_commitment(self._digest, self.index, self._b)
        sig = self._identity.sign(ShareKeys.signing_bytes(self._digest, self.index, cts, commitment))
        self.phase = ClientPhase.SHARED
        return ShareKeys(self.index, tuple(cts), commitment, sig)

    def mask_material(self) -> MaskMaterial:
        """This attempt's mask secrets once keys are shared, to expand the masks during training (precompute.py)."""
        self._expect(ClientPhase.SHARED, "expand its masks")
        assert self._b is not None
        pairwise = {v: x25519_shared_secret(self._s.private_key, self._peer_keys[v][1]) for v in sorted(self.neighbours)}
        return MaskMaterial(self.index, self._b, pairwise, self.params.modulus_bits, self._digest, self.params.vector_length)

    # ------------------------------------------------------------------ phase 2
    def _open(self, sender: int, ct: bytes) -> tuple[Share, Share] | None:
        try:
            key = share_key(self._c, self._peer_keys[sender][0], self.index, sender, self._digest)
            plain = AESGCM(key).decrypt(ct[:12], ct[12:], share_associated_data(self._digest, sender, self.index))
        except (InvalidTag, KeyAgreementError, ValueError):
            return None
        if plain[:4] != sender.to_bytes(4, "big") or plain[4:8] != self.index.to_bytes(4, "big"):
            return None
        try:
            b_share = Share.from_bytes(plain[8:8 + 70])
            s_share = Share.from_bytes(plain[8 + 70:])
        except ShareError:
            return None
        if b_share.x != self.index or s_share.x != self.index:
            return None
        return b_share, s_share

    def masked_input(self, bundle: ShareBundle, plain: PlainInput) -> MaskedInput:
        """Check and open the shares addressed to us, then send y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)."""
        self.open_bundle(bundle)
        return self.mask_opened(plain)

    def mask_opened(self, plain: PlainInput) -> MaskedInput:
        """The masked input of ``plain`` once the bundle is opened (:meth:`open_bundle`): a daemon opens it while it
        still trains, so that the end of training is followed by the masking alone (no fetch, no decryption)."""
        self._expect(ClientPhase.SHARED, "send its masked input")
        if self._masked_with is None:
            raise SecAggRefused("the share bundle was not opened before the masked input", "bad_bundle")
        expected = self._masked_with
        p = self.params
        x, clipped = encode_input(p, plain, self._rng, words=True)  # ours to mask in place
        assert self._b is not None
        y = self.precomputed.mask(x, expected, in_place=True) if self.precomputed is not None else None
        if y is None:  # (the precomputed masks failed before touching x: it is still the plain encoding)
            pairwise = self._pairwise_secrets(expected)  # refuses a degenerate peer key (which failed the precompute)
            y = mask_words(x, self.index, self._b, pairwise, p.modulus_bits, context=self._digest)
        return self.sign_masked_payload(pack(y, p.modulus_bits), clipped)

    def masking_job(self, bundle: ShareBundle, rounding_seed: int) -> MaskingJob:
        """Open the bundle (as :meth:`masked_input` does) and hand out what masking the input takes, so another
        process can mask it (the simulation's client workers: :func:`mask_payload`); the payload it returns is
        signed with :meth:`sign_masked_payload`. ``rounding_seed`` seeds the stochastic rounding there, as the
        ``rng`` of this client would (it must then not be used for an input of this client here)."""
        expected = self.open_bundle(bundle)
        assert self._b is not None
        return MaskingJob(self.params, self.index, self._b, self._pairwise_secrets(expected), self._digest, rounding_seed)

    def open_bundle(self, bundle: ShareBundle) -> frozenset[int]:
        """Check the bundle and keep the shares it brings; returns the neighbours that shared keys (masked with)."""
        self._expect(ClientPhase.SHARED, "send its masked input")
        p = self.params
        if bundle.recipient != self.index:
            raise SecAggRefused("the share bundle is addressed to another client", "bad_bundle")
        survivors = frozenset(bundle.survivors)
        if self.index not in survivors:
            raise SecAggRefused("the server lists this client as not having shared its keys", "bad_bundle")
        expected = self.neighbours & survivors
        senders = [s for s, _ in bundle.ciphertexts]
        if len(set(senders)) != len(senders) or set(senders) != expected:
            raise SecAggRefused("the bundle's ciphertexts do not come from exactly this client's neighbours in U2",
                                "bad_bundle")
        if len(expected) + 1 < p.threshold:
            raise SecAggRefused(f"only {len(expected)} neighbours shared keys: fewer than threshold {p.threshold} holders",
                                "too_few_neighbours")
        rejected = []
        for sender, ct in sorted(bundle.ciphertexts):
            opened = self._open(sender, ct)
            if opened is None:
                rejected.append(sender)
            else:
                self._held[sender] = opened
        self._share_survivors = survivors
        self.rejected = tuple(rejected)
        self._masked_with = frozenset(expected)
        return self._masked_with

    def _pairwise_secrets(self, expected: Set[int]) -> dict[int, bytes]:
        pairwise = {}
        for v in sorted(expected):
            try:
                pairwise[v] = x25519_shared_secret(self._s.private_key, self._peer_keys[v][1])
            except KeyAgreementError:
                raise SecAggRefused(f"client {v}'s mask key is degenerate", "bad_roster") from None
        return pairwise

    def sign_masked_payload(self, payload: bytes, clipped: bool, payload_sha256: bytes | None = None) -> MaskedInput:
        """Sign a masked payload made from this client's opened bundle (here or by :func:`mask_payload`).

        ``payload_sha256``: the payload's SHA-256 when whoever masked it for this client already computed it (the
        simulation's worker, in parallel with the other clients' training); computed here otherwise. A wrong one
        only makes the server refuse this client's input (it checks the digest against the bytes it received)."""
        self._expect(ClientPhase.SHARED, "send its masked input")
        if self.index not in self._share_survivors:
            raise SecAggRefused("the share bundle was not opened before the masked input", "bad_bundle")
        self.clipped = clipped
        digest = payload_sha256 if payload_sha256 else hashlib.sha256(payload).digest()
        sig = self._identity.sign(MaskedInput.signing_bytes(self._digest, self.index, digest, self.rejected))
        self.phase = ClientPhase.MASKED
        return MaskedInput(self.index, payload, self.rejected, sig, digest)

    # ------------------------------------------------------------------ phase 3
    def _check_set(self, survivors: tuple[int, ...], dropped: tuple[int, ...], what: str) -> frozenset[int]:
        """The checks a set must pass before this client signs it or answers for it; returns its local survivors."""
        p = self.params
        alive, gone = set(survivors), set(dropped)
        both = alive & gone
        if both:
            raise SecAggRefused(f"{what} names clients {sorted(both)} both as survivors and as dropped: that would reveal "
                                f"their inputs", "both_shares_requested")
        if self.index not in alive:
            raise SecAggRefused(f"{what} lists this client as dropped although it sent its masked input",
                                "bad_unmask_request")
        if not (alive | gone) <= self._share_survivors:
            raise SecAggRefused(f"{what} names clients that never shared keys", "bad_unmask_request")
        local = (self.neighbours & self._share_survivors) | {self.index}
        if len(alive & local) < p.threshold:
            raise SecAggRefused(f"only {len(alive & local)} survivors among this client's share holders, fewer than the "
                                f"threshold {p.threshold}", "too_few_survivors")
        return frozenset(alive & local)

    def consistency_check(self, check: ConsistencyCheck) -> ConsistencySignature:
        """Sign the set of clients whose masked inputs the server says it holds: once per attempt."""
        self._expect(ClientPhase.MASKED, "sign a survivor set (it signs one set per round)")
        self._check_set(check.survivors, check.dropped, "the consistency check")
        sig = self._identity.sign(ConsistencyCheck.signing_bytes(self._digest, self.params.session, self.params.round,
                                                                 self.index, check.survivors, check.dropped))
        self._signed_set = (tuple(check.survivors), tuple(check.dropped))
        self.phase = ClientPhase.CHECKED
        return ConsistencySignature(self.index, sig)

    def _valid_signers(self, request: UnmaskRequest, local: frozenset[int]) -> set[int]:
        """The holders (itself and its neighbours) whose signature on exactly this set verifies.

        A signature that does not verify, or one from a client that is not a survivor, is a server
        that lied about who signed: refused outright rather than skipped. HMAC rounds cannot check peers'
        signatures (their keys are the server's too): there the server's word is all there is (auth.py)."""
        signers = [i for i, _ in request.signatures]
        if len(set(signers)) != len(signers):
            raise SecAggRefused("the unmask request repeats a signer", "bad_consistency_signature")
        if not set(signers) <= set(request.survivors):
            raise SecAggRefused("the unmask request carries signatures of clients outside its survivor set",
                                "bad_consistency_signature")
        valid: set[int] = set()
        for i, sig in request.signatures:
            if i not in local:
                continue  # not one of this client's share holders: not counted (no key checked for it)
            if self.params.auth != ED25519:
                valid.add(i)
                continue
            key = self._identity.verify_key if i == self.index else self._peer_verify.get(i)
            data = ConsistencyCheck.signing_bytes(self._digest, self.params.session, self.params.round, i,
                                                  request.survivors, request.dropped)
            try:
                ok = key is not None and Verifier(ED25519, key).verify(data, sig)
            except ValueError:
                ok = False
            if not ok:
                raise SecAggRefused(f"client {i}'s signature on the survivor set does not verify",
                                    "bad_consistency_signature")
            valid.add(i)
        return valid

    # ------------------------------------------------------------------ phase 4
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, per neighbour, the share of b_v (v survived) or of s_sk_v (v dropped) - never both, and only for
        the set this client signed, once t of its share holders have signed that same set."""
        self._expect(ClientPhase.CHECKED, "reveal shares (it answers one unmask request per round, after signing the set)")
        p = self.params
        if (tuple(request.survivors), tuple(request.dropped)) != self._signed_set:
            raise SecAggRefused("the unmask request is for a set other than the one this client signed",
                                "set_mismatch")
        local = self._check_set(request.survivors, request.dropped, "the unmask request")
        holders = (self.neighbours & self._share_survivors) | {self.index}
        valid = self._valid_signers(request, frozenset(holders))
        if len(valid) < p.threshold:
            raise SecAggRefused(f"only {len(valid)} of this client's share holders signed the survivor set, fewer than "
                                f"the threshold {p.threshold}", "too_few_signatures")
        alive, dropped = set(request.survivors), set(request.dropped)
        assert local and self._own_b_share is not None
        self_shares = [(self.index, self._own_b_share.to_bytes())]
        key_shares = []
        for v in sorted(self.neighbours):
            held = self._held.get(v)
            if held is None:
                continue
            if v in alive:
                self_shares.append((v, held[0].to_bytes()))
            elif v in dropped:
                key_shares.append((v, held[1].to_bytes()))
        assert not {v for v, _ in self_shares} & {v for v, _ in key_shares}  # never both shares of one client
        self_shares.sort()
        sig = self._identity.sign(UnmaskResponse.signing_bytes(self._digest, self.index, self_shares, key_shares))
        self.phase = ClientPhase.DONE
        self._forget()
        return UnmaskResponse(self.index, tuple(self_shares), tuple(key_shares), sig)

    def _forget(self) -> None:
        """Drop the round's secrets once they can no longer be needed (best effort: Python may keep copies)."""
        self._b = None
        self._own_b_share = None
        self._held.clear()
        self._c = self._s = None  # type: ignore[assignment]
        self.precomputed = None
