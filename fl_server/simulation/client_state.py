"""The simulated clients' SCAFFOLD control variates c_i, kept by the driver between rounds.

A real client keeps its c_i in its own state directory; the simulation plays every client, so
it keeps them all. One model-sized vector per client that has taken part adds up (100 clients x
the 1.66 M-parameter CNN = 660 MB), too much to hold in memory or to rewrite in every round's
checkpoint, so with a run folder each variate lives in its own file,
``client_state/client<id>-round<r>.pt``, written once when the client trains in round r.

Resume is exact because files are versioned: the checkpoint records which round's file is each
client's current variate (:meth:`ClientVariates.state_dict`), a round's new files never overwrite
the versions the last checkpoint names, and superseded or orphaned files (from a round that was
interrupted before its checkpoint) are deleted only after a checkpoint that no longer names them
(:meth:`ClientVariates.prune`). Without a run folder the variates stay in memory.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from fl_server.store.run_dir import atomic_write_bytes

_FILE = re.compile(r"client(?P<cid>-?\d+)-round(?P<round>\d+)\.pt")


class ClientVariates:
    def __init__(self, numel: int, folder: Path | None = None) -> None:
        self.numel = numel
        self.folder = folder
        self._versions: dict[int, int] = {}  # client -> round of its current file
        self._memory: dict[int, torch.Tensor] = {}

    def _path(self, cid: int, round_number: int) -> Path:
        assert self.folder is not None
        return self.folder / f"client{cid}-round{round_number}.pt"

    def get(self, cid: int) -> torch.Tensor:
        """c_i, zeros for a client that has not trained yet."""
        if self.folder is None:
            stored = self._memory.get(cid)
        elif cid in self._versions:
            stored = torch.load(self._path(cid, self._versions[cid]), map_location="cpu", weights_only=True)
        else:
            stored = None
        return torch.zeros(self.numel, dtype=torch.float32) if stored is None else stored.clone()

    def put(self, cid: int, variate: torch.Tensor, round_number: int) -> None:
        variate = variate.detach().to(torch.float32).contiguous()
        if variate.numel() != self.numel:
            raise ValueError(f"client {cid}'s control variate has {variate.numel()} values, expected {self.numel}")
        if self.folder is None:
            self._memory[cid] = variate.clone()
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(variate, buf)
        atomic_write_bytes(self._path(cid, round_number), buf.getvalue())
        self._versions[cid] = round_number

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint records: the file version of each client (or the tensors, in memory)."""
        if self.folder is None:
            return {"numel": self.numel, "tensors": {cid: t.clone() for cid, t in self._memory.items()}}
        return {"numel": self.numel, "versions": dict(self._versions)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            state = {"numel": self.numel}
        if int(state["numel"]) != self.numel:
            raise ValueError(f"stored control variates have {state['numel']} values, the model has {self.numel}")
        self._memory = {int(c): t.to(torch.float32).clone() for c, t in state.get("tensors", {}).items()}
        self._versions = {int(c): int(r) for c, r in state.get("versions", {}).items()}
        if self.folder is not None:
            missing = [c for c, r in self._versions.items() if not self._path(c, r).is_file()]
            if missing:
                raise ValueError(f"the checkpoint names control-variate files that are missing in {self.folder} "
                                 f"(clients {missing[:5]}): the run cannot be resumed exactly")

    def prune(self) -> None:
        """Delete files the current versions do not name (call after the checkpoint naming them is durable)."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            m = _FILE.fullmatch(path.name)
            if m is None:
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                continue
            if self._versions.get(int(m["cid"])) != int(m["round"]):
                path.unlink(missing_ok=True)
