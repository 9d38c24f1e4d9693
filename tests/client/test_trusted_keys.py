"""Pinned secure-aggregation keys on the client: the file format (fl_client/trusted_keys.py) and the two
command-line options that build and use it (``--print-verify-key``, ``--secagg-trusted-keys``), run as real
``python -m fl_client`` processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_client.trusted_keys import IDENTITY_FILE, format_verify_key, load_or_create_identity, load_trusted_keys
from fl_common.secagg import SigningIdentity

REPO = Path(__file__).resolve().parents[2]


def _keys(n: int) -> list[bytes]:
    return [SigningIdentity.generate_ed25519().verify_key for _ in range(n)]


def _write(tmp_path: Path, text: str, name: str = "keys.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(ValueError) as err:
        load_trusted_keys(path)
    return str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m fl_client`` from the repository root (the package is importable from there)."""
    return subprocess.run([sys.executable, "-m", "fl_client", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- the file
def test_keys_with_labels_comments_and_blank_lines(tmp_path: Path) -> None:
    a, b, c = _keys(3)
    path = _write(tmp_path, f"# clinics federation\n\n{a.hex()}  clinic a (Berlin)\n   \n{b.hex().upper()}\n"
                            f"\t{c.hex()}\t# c, with a tab\n  # an indented comment\n")
    assert load_trusted_keys(path) == frozenset({a, b, c})
    assert load_trusted_keys(str(path)) == frozenset({a, b, c})


def test_format_verify_key_round_trips_through_the_file(tmp_path: Path) -> None:
    keys = _keys(2)
    assert all(len(format_verify_key(k)) == 64 for k in keys)
    path = _write(tmp_path, "".join(f"{format_verify_key(k)}  label {i}\n" for i, k in enumerate(keys)))
    assert load_trusted_keys(path) == frozenset(keys)
    with pytest.raises(ValueError):
        format_verify_key(b"x" * 31)


def test_a_key_of_the_wrong_length_names_its_line(tmp_path: Path) -> None:
    (a,) = _keys(1)
    path = _write(tmp_path, f"# ok\n{a.hex()}\n{a.hex()[:-2]}  short\n")
    assert _error(path) == f"{path} line 3: expected 64 hex characters (an Ed25519 verifying key), got 62 characters"
    path = _write(tmp_path, f"{a.hex()}ff\n")
    assert _error(path).startswith(f"{path} line 1: expected 64 hex characters")


def test_raw_32_byte_strings_that_are_not_hex_are_refused(tmp_path: Path) -> None:
    raw32 = "k" * 32  # 32 bytes pasted as text instead of their hex
    assert _error(_write(tmp_path, f"\n{raw32}\n")).endswith("line 2: expected 64 hex characters (an Ed25519 verifying key), "
                                                             "got 32 characters")
    not_hex = "g" + "0" * 63  # the right length, one character that is not hex
    assert _error(_write(tmp_path, f"# x\n# y\n{not_hex} label\n")).endswith(
        "line 3: expected 64 hex characters (an Ed25519 verifying key), found a character that is not hex")


def test_a_key_listed_twice_is_refused(tmp_path: Path) -> None:
    a, b = _keys(2)
    message = _error(_write(tmp_path, f"{a.hex()} one\n{b.hex()} two\n{a.hex().upper()} three\n"))
    assert "line 3: the key of line 1 again" in message


def test_an_empty_or_comment_only_file_is_refused(tmp_path: Path) -> None:
    for text in ("", "\n\n", "# only a comment\n   \n"):
        path = _write(tmp_path, text)
        assert _error(path) == f"{path}: no keys (expected 64 hex characters (an Ed25519 verifying key) per line)"


def test_a_missing_or_binary_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    assert _error(tmp_path / "absent.txt").startswith(f"{tmp_path / 'absent.txt'}: cannot read the pinned-keys file")
    binary = tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert _error(binary) == f"{binary}: not UTF-8 text"


def test_the_identity_is_made_once_and_then_loaded(tmp_path: Path) -> None:
    state = tmp_path / "state" / "alice"
    first, created = load_or_create_identity(state)
    assert created and (state / IDENTITY_FILE).stat().st_mode & 0o777 == 0o600
    second, created = load_or_create_identity(state)
    assert not created and second.verify_key == first.verify_key


# --------------------------------------------------------------------------- the command line
def test_print_verify_key_makes_the_key_once_and_prints_it_with_its_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "d0"
    first = _cli("--print-verify-key", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    key_file = state / IDENTITY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    second = _cli("--print-verify-key", "--state-dir", str(state))
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert len(lines) == 1
    key_hex, label = lines[0].split(maxsplit=1)
    assert len(key_hex) == 64 and label == str(state)
    assert bytes.fromhex(key_hex) == SigningIdentity.ed25519(key_file.read_bytes()).verify_key
    # the printed line is a valid pinned-keys file as it stands
    assert load_trusted_keys(_write(tmp_path, first.stdout)) == frozenset({bytes.fromhex(key_hex)})


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_missing_pinned_keys_file_exits_2_with_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    line = _one_error_line(_cli("--server-url", "http://127.0.0.1:9", "--secagg-trusted-keys", str(missing),
                                "--state-dir", str(tmp_path / "s")))
    assert str(missing) in line and "cannot read" in line
    assert not (tmp_path / "s").exists()  # nothing started: no state dir made


def test_a_malformed_pinned_keys_file_exits_2_with_one_error_line(tmp_path: Path) -> None:
    (a,) = _keys(1)
    bad = _write(tmp_path, f"{a.hex()} good\nnot-a-key here\n")
    line = _one_error_line(_cli("--server-url", "http://127.0.0.1:9", "--secagg-trusted-keys", str(bad),
                                "--state-dir", str(tmp_path / "s")))
    assert line == f"error: {bad} line 2: expected 64 hex characters (an Ed25519 verifying key), got 9 characters"


def test_the_server_url_is_still_required_to_run_the_daemon(tmp_path: Path) -> None:
    result = _cli("--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2 and "required: --server-url" in result.stderr
