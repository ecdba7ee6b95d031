"""Network deconvolution layers, batch whitening, and the tools that put them into (and fold them out of) models."""

from seg.nn.convert import deconvolve, fold_deconv
from seg.nn.deconv import FastDeconv, SampleNormConv2d
from seg.nn.isqrt import isqrt_newton_schulz
from seg.nn.iternorm import IterNorm
from seg.nn.whitening import ChannelDeconv, Delinear

__all__ = ["ChannelDeconv", "Delinear", "FastDeconv", "IterNorm", "SampleNormConv2d", "deconvolve", "fold_deconv",
           "isqrt_newton_schulz"]
