"""``python -m fl_client --device``: refused before registering when misspelt or when the GPU is not there
(called through main(), which is what the console script runs)."""

from __future__ import annotations

import pytest
import torch

from fl_client.__main__ import main


def test_misspelt_device_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server-url", "http://127.0.0.1:9", "--device", "gpu"]) == 2
    assert "--device: device 'gpu': allowed 'cpu', 'cuda', 'cuda:N'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the refusal cannot show")
def test_missing_gpu_is_refused_not_replaced_by_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server-url", "http://127.0.0.1:9", "--device", "cuda:0"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
