"""Harmonic CNN (Won, Chun, Nieto and Serra, "Data-driven harmonic filters for audio
representation learning", ICASSP 2020): the model of the AdamP paper's audio experiments (Table 5).

    waveform (batch, samples)
      -> power STFT (torchaudio Spectrogram)
      -> harmonic filter bank: triangular band-pass filters centred at h * f0_k, for the
         harmonics h = 1..n_harmonic of n_bands centre frequencies f0_k spaced evenly in pitch
         (semitone_scale per semitone, from f_min up to sample_rate / (2 n_harmonic), so the
         highest harmonic stays below Nyquist); bandwidth ERB(f) / Q = (0.1079 f + 24.7) / Q,
         with Q learnable and, if asked, f0 too; in dB
      -> (batch, n_harmonic, n_bands, frames): the harmonics are the channels of a 2-D CNN
      -> BatchNorm, conv3x3-BN-ReLU blocks (some residual) each max-pooled, global max pool
      -> Linear-BN-ReLU-Dropout-Linear: one logit per class (multi-label: a sigmoid each)

The defaults are the authors' code (github.com/minzwon/sota-music-tagging-models, HarmonicCNN):
6 harmonics, 2 bands a semitone from C1, 128/256 channels in 7 blocks, learnable Q and fixed f0.
`forward` returns logits; the loss (BCE with logits) and the metrics apply the sigmoid. The front
end runs in float32 even under autocast (a dB scale in bf16 loses the quiet bands).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

C1_HZ = 32.703  # the reference's lowest note


def hz_to_midi(hz: float) -> float:
    return 69 + 12 * math.log2(hz / 440)


class HarmonicFilterbank(nn.Module):
    """(batch, samples) -> (batch, n_harmonic, n_bands, frames): harmonic spectrogram in dB."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, hop_length: int | None = None,
                 n_harmonic: int = 6, semitone_scale: int = 2, f_min: float = C1_HZ,
                 learn_f0: bool = False, learn_q: bool = True, q: float = 1.0,
                 erb_alpha: float = 0.1079, erb_beta: float = 24.7):
        super().__init__()
        top = sample_rate / (2 * n_harmonic)  # the highest f0 whose top harmonic is still below Nyquist
        n_bands = int((hz_to_midi(top) - hz_to_midi(f_min)) * semitone_scale)
        if n_bands < 1:
            raise ValueError(f"no band between f_min={f_min} Hz and sample_rate / (2 n_harmonic) = {top:.1f} Hz")
        self.n_harmonic, self.n_bands = n_harmonic, n_bands
        self.erb_alpha, self.erb_beta = erb_alpha, erb_beta
        midi = hz_to_midi(f_min) + torch.arange(n_bands, dtype=torch.float32) / semitone_scale
        f0 = 440 * 2 ** ((midi - 69) / 12)
        q = torch.tensor(float(q))
        if learn_f0:
            self.f0 = nn.Parameter(f0)
        else:
            self.register_buffer("f0", f0)
        if learn_q:
            self.q = nn.Parameter(q)
        else:
            self.register_buffer("q", q)
        self.register_buffer("harmonics", torch.arange(1, n_harmonic + 1, dtype=torch.float32), persistent=False)
        self.register_buffer("fft_hz", torch.linspace(0, sample_rate / 2, n_fft // 2 + 1), persistent=False)
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop_length, power=2.0)
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power")

    def centres(self) -> torch.Tensor:
        """(n_harmonic, n_bands) centre frequencies in Hz: row h - 1 holds h * f0."""
        return self.harmonics[:, None] * self.f0[None, :]

    def filters(self) -> torch.Tensor:
        """(fft bins, n_harmonic * n_bands) triangular filters, 1 at the centre, 0 at +-bandwidth / 2."""
        centre = self.centres().reshape(1, -1)
        bandwidth = (self.erb_alpha * centre + self.erb_beta) / self.q
        return (1 - 2 * (self.fft_hz[:, None] - centre).abs() / bandwidth).clamp(min=0)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            power = self.spectrogram(wave.float())  # (batch, bins, frames)
            bands = torch.matmul(power.transpose(1, 2), self.filters()).transpose(1, 2)
            bands = bands.reshape(wave.shape[0], self.n_harmonic, self.n_bands, -1)
            return self.to_db(bands)


class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU, then max-pooled; residual: conv-BN-ReLU-conv-BN added to the input, ReLU
    (the reference's Res_2d_mp). The pool shrinks to fit inputs smaller than it."""

    def __init__(self, in_channels: int, out_channels: int, pool: Sequence[int], residual: bool):
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(f"a residual block keeps its width; got {in_channels} -> {out_channels} channels")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False) if residual else None
        self.bn2 = nn.BatchNorm2d(out_channels) if residual else None
        self.pool = (int(pool[0]), int(pool[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.conv2 is not None:
            out = F.relu(x + self.bn2(self.conv2(out)))
        kernel = (min(self.pool[0], out.shape[-2]), min(self.pool[1], out.shape[-1]))
        return F.max_pool2d(out, kernel)


class HarmonicCNN(nn.Module):
    """Waveforms (batch, samples) -> logits (batch, num_classes)."""

    def __init__(self, num_classes: int, sample_rate: int = 16000, n_fft: int = 512, hop_length: int | None = None,
                 n_harmonic: int = 6, semitone_scale: int = 2, f_min: float = C1_HZ, learn_f0: bool = False,
                 learn_q: bool = True, q: float = 1.0,
                 channels: Sequence[int] = (128, 128, 128, 128, 256, 256, 256),
                 residual: Sequence[bool] = (False, True, False, True, False, True, True),
                 pools: Sequence[Sequence[int]] = ((2, 2),) * 5 + ((2, 3),) * 2,
                 dropout: float = 0.5):
        super().__init__()
        if not (len(channels) == len(residual) == len(pools)) or not channels:
            raise ValueError(f"channels, residual and pools need one entry per block; got "
                             f"{len(channels)}, {len(residual)} and {len(pools)}")
        self.frontend = HarmonicFilterbank(sample_rate, n_fft, hop_length, n_harmonic, semitone_scale, f_min,
                                           learn_f0, learn_q, q)
        self.input_bn = nn.BatchNorm2d(n_harmonic)
        widths = [n_harmonic, *channels]
        self.blocks = nn.Sequential(*(ConvBlock(widths[i], widths[i + 1], pools[i], bool(residual[i]))
                                      for i in range(len(channels))))
        width = channels[-1]
        self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.input_bn(self.frontend(wave)))
        return self.head(x.amax(dim=(2, 3)))  # global max pool over what is left of bands and frames
