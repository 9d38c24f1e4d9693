"""Handcrafted features for DP-SGD: the 2-D wavelet scattering transform (Mallat 2012; Bruna and
Mallat 2013) and the two small models Tramer and Boneh train on it ("Differentially Private
Learning Needs Better Features (or Much More Data)", ICLR 2021).

Why: DP-SGD pays for every step it takes on learned features, and at small epsilon it cannot take
many. A scattering transform is fixed (no trainable parameters, nothing learned from data, so it
costs no privacy), and its features already separate Fashion-MNIST well: Tramer and Boneh reach
89.7 % at epsilon 3 with a linear layer on them, where end-to-end CNNs reach 86 %. Only the small
head after it is trained under DP.

Why our own implementation and not kymatio: kymatio 0.3.0 (the registry's newest) does not import
through its public path with the scipy installed here (``kymatio.torch`` imports its 3-D filter
bank, which needs ``scipy.special.sph_harm``, removed in scipy 1.17), and it keeps its filters as
*persistent* buffers, so they would enter the model's ``state_dict`` and travel, be compressed,
masked and averaged with every update. Here the filters are non-persistent buffers: the
``state_dict`` holds only the trained head. The algorithm and the filter bank follow kymatio's
``scattering2d`` exactly (same Morlet filters, reflection padding, Fourier-domain subsampling,
channel order); ``tests/common/test_scattering.py`` holds the output to values computed with
kymatio 0.3.0.

Output for a (B, C, H, W) input with J scales and L angles: (B, C * K, H', W') with
K = 1 + J L + L^2 J (J - 1) / 2 (81 for J = 2, L = 8) and H' = ceil-ish H / 2^J (7 for 28).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Scattering2D", "ScatterLinear", "ScatterCNN", "scattering_channels"]


def scattering_channels(scales: int, angles: int) -> int:
    """Channels per input channel of a 2-layer scattering transform (J scales, L angles): order 0, 1
    and 2 paths, 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + scales * angles + angles * angles * scales * (scales - 1) // 2


def _gabor_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """kymatio's gabor_2d: a Gabor filter in space, periodised over 5 x 5 copies of the m x n grid."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    rot_inv = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    stretch = np.array([[1.0, 0.0], [0.0, slant * slant]])
    curv = rot @ stretch @ rot_inv / (2 * sigma * sigma)
    gab = np.zeros((m, n), np.complex128)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * m:m + ex * m, ey * n:n + ey * n]
            arg = (-(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
                   + 1j * (xx * xi * math.cos(theta) + yy * xi * math.sin(theta)))
            gab += np.exp(arg)
    return gab / (2 * 3.1415 * sigma * sigma / slant)  # kymatio's constant, kept for identical outputs


def _morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter minus the Gaussian that makes its mean zero (a Morlet wavelet)."""
    wv = _gabor_2d(m, n, sigma, theta, xi, slant)
    wv_modulus = _gabor_2d(m, n, sigma, theta, 0.0, slant)
    out: np.ndarray = wv - np.sum(wv) / np.sum(wv_modulus) * wv_modulus
    return out


def _periodize(filter_hat: np.ndarray, res: int) -> np.ndarray:
    """kymatio's periodize_filter_fft: the filter's spectrum for a signal subsampled by 2^res
    (the high frequencies masked, then the aliases summed)."""
    m, n = filter_hat.shape
    k = 2**res
    mask = np.ones(filter_hat.shape)
    start_x, len_x = int(m * 2 ** (-res - 1)), int(m * (1 - 2 ** (-res)))
    start_y, len_y = int(n * 2 ** (-res - 1)), int(n * (1 - 2 ** (-res)))
    mask[start_x:start_x + len_x, :] = 0
    mask[:, start_y:start_y + len_y] = 0
    out: np.ndarray = (filter_hat * mask).reshape(k, m // k, k, n // k).sum(axis=(0, 2))
    return out


def _subsample_fourier(x: torch.Tensor, k: int) -> torch.Tensor:
    """The spectrum of the signal subsampled by k in space (periodisation of its spectrum)."""
    if k == 1:
        return x
    *batch, m, n = x.shape
    # on the real view, one axis at a time: a multi-axis mean of a complex tensor is ~10x slower on CPU
    real = torch.view_as_real(x).reshape(*batch, k, m // k, k, n // k, 2).mean(dim=-3).mean(dim=-4)
    return torch.view_as_complex(real.contiguous())


class Scattering2D(nn.Module):
    """The 2-layer Morlet scattering transform of kymatio (``Scattering2D(J, shape, L)``), vectorised
    over the angles; data-independent and without trainable parameters."""

    def __init__(self, shape: tuple[int, int], scales: int = 2, angles: int = 8) -> None:
        super().__init__()
        M, N = shape  # noqa: N806 (kymatio's and the papers' notation, as J and L below)
        J, L = scales, angles  # noqa: N806
        if J < 1 or L < 1:
            raise ValueError(f"scattering needs J >= 1 and L >= 1, got J={J}, L={L}")
        if min(M, N) < 2**J:
            raise ValueError(f"scattering with J={J} needs images of at least {2**J}x{2**J}, got {M}x{N}")
        self.scales, self.angles, self.shape = J, L, (M, N)
        self.M_padded = ((M + 2**J) // 2**J + 1) * 2**J
        self.N_padded = ((N + 2**J) // 2**J + 1) * 2**J
        self.pad = ((self.N_padded - N) // 2, (self.N_padded - N + 1) // 2,
                    (self.M_padded - M) // 2, (self.M_padded - M + 1) // 2)  # F.pad order: left, right, top, bottom
        if max(self.pad[2:]) >= M or max(self.pad[:2]) >= N:
            raise ValueError(f"scattering with J={J} pads {self.pad} pixels, more than the {M}x{N} image allows")
        # psi[j][res]: the L wavelets of scale j as (L, M_res, N_res) spectra, for res <= j; phi[res]: the low-pass
        for j in range(J):
            spectra = [np.real(np.fft.fft2(_morlet_2d(self.M_padded, self.N_padded, 0.8 * 2**j,
                                                      (int(L - L / 2 - 1) - theta) * math.pi / L,
                                                      3.0 / 4.0 * math.pi / 2**j, 4.0 / L)))
                       for theta in range(L)]
            for res in range(min(j + 1, max(J - 1, 1))):
                bank = np.stack([_periodize(s, res) for s in spectra])
                self.register_buffer(f"psi_{j}_{res}", torch.tensor(bank, dtype=torch.float32), persistent=False)
        phi_hat = np.real(np.fft.fft2(_gabor_2d(self.M_padded, self.N_padded, 0.8 * 2 ** (J - 1), 0.0, 0.0)))
        for res in range(J):
            self.register_buffer(f"phi_{res}", torch.tensor(_periodize(phi_hat, res), dtype=torch.float32),
                                 persistent=False)

    def _psi(self, j: int, res: int) -> torch.Tensor:
        out: torch.Tensor = getattr(self, f"psi_{j}_{res}")
        return out

    def _phi(self, res: int) -> torch.Tensor:
        out: torch.Tensor = getattr(self, f"phi_{res}")
        return out

    def _low_pass(self, u_hat: torch.Tensor, res: int) -> torch.Tensor:
        """Low-pass, subsample to the final 2^J grid, back to space, drop the padding's border."""
        s_hat = _subsample_fourier(u_hat * self._phi(res), 2 ** (self.scales - res))
        out: torch.Tensor = torch.fft.ifft2(s_hat).real[..., 1:-1, 1:-1]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"scattering expects (batch, channels, {self.shape[0]}, {self.shape[1]}), got {tuple(x.shape)}")
        batch, channels = x.shape[:2]
        u0_hat = torch.fft.fft2(F.pad(x, self.pad, mode="reflect").to(torch.complex64))  # (B, C, M, N)
        order0 = self._low_pass(u0_hat, 0).unsqueeze(2)
        order1: list[torch.Tensor] = []
        order2: list[torch.Tensor] = []
        for j1 in range(self.scales):
            # the L first-order paths of scale j1 at once: |x * psi_{j1, theta}|, subsampled by 2^j1
            u1 = torch.fft.ifft2(_subsample_fourier(u0_hat.unsqueeze(2) * self._psi(j1, 0), 2**j1)).abs()
            u1_hat = torch.fft.fft2(u1.to(torch.complex64))  # (B, C, L, M/2^j1, N/2^j1)
            order1.append(self._low_pass(u1_hat, j1))
            per_j2 = []
            for j2 in range(j1 + 1, self.scales):
                u2 = torch.fft.ifft2(_subsample_fourier(u1_hat.unsqueeze(3) * self._psi(j2, j1), 2 ** (j2 - j1))).abs()
                per_j2.append(self._low_pass(torch.fft.fft2(u2.to(torch.complex64)), j2))  # (B, C, L1, L2, h, w)
            if per_j2:  # kymatio's order: first-order path n1 outer, then (j2, theta2)
                order2.append(torch.cat(per_j2, dim=3).flatten(2, 3))
        out = torch.cat([order0, *order1, *order2], dim=2)  # (B, C, K, h, w)
        return out.reshape(batch, channels * out.shape[2], *out.shape[-2:])


class _ScatterFrontEnd(nn.Module):
    """Scattering (fixed, run without autograd: it has nothing to train) then a GroupNorm without
    affine parameters: per-example statistics, so it neither leaks across a batch nor needs
    per-sample gradients (Tramer and Boneh normalise the features the same way)."""

    def __init__(self, input_shape: tuple[int, int, int], scales: int, angles: int, groups: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.scattering = Scattering2D((height, width), scales=scales, angles=angles)
        self.channels = channels * scattering_channels(scales, angles)
        if self.channels % groups:
            raise ValueError(f"GroupNorm groups ({groups}) must divide the {self.channels} scattering channels")
        self.norm = nn.GroupNorm(groups, self.channels, affine=False)
        with torch.no_grad():
            self.out_shape = tuple(self.scattering(torch.zeros(1, channels, height, width)).shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.scattering(x)
        out: torch.Tensor = self.norm(features)
        return out


#: GroupNorm groups of the scattering features: 27 (of 81 per input channel), Tramer and Boneh's choice.
DEFAULT_GROUPS = 27


class ScatterLinear(nn.Module):
    """ScatterNet + linear (``scatter_linear``): a logistic regression on normalised scattering
    features; 39,700 parameters on 1x28x28 inputs with 10 classes."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, *,
                 scales: int = 2, angles: int = 8, groups: int = DEFAULT_GROUPS) -> None:
        super().__init__()
        self.front = _ScatterFrontEnd(input_shape, scales, angles, groups * input_shape[0])
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(self.front.out_shape), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.front(x))
        return out


class ScatterCNN(nn.Module):
    """ScatterNet + a small tanh CNN (``scatter_cnn``): conv 3x3 ``hidden_size`` channels -> tanh ->
    maxpool 2 -> conv 3x3 ``hidden_size`` -> tanh -> fc classes, on normalised scattering features
    (after Tramer and Boneh's ScatterNet+CNN, shrunk: DP-SGD's per-client budget here buys few steps)."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, *,
                 hidden_size: int = 32, scales: int = 2, angles: int = 8, groups: int = DEFAULT_GROUPS) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.front = _ScatterFrontEnd(input_shape, scales, angles, groups * input_shape[0])
        self.features = nn.Sequential(
            nn.Conv2d(self.front.channels, hidden_size, kernel_size=3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1), nn.Tanh(),
        )
        with torch.no_grad():
            flat = int(self.features(torch.zeros(1, *self.front.out_shape)).numel())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(self.front(x)))
        return out
