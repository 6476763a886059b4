"""Every closed set of choices natgrad takes, as a ``Literal`` type and the tuple of its values.

The config checks each value once (``config.CHOICES``); code past that boundary takes the typed value on trust.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["natural", "gradnorm", "gradnorm-fd", "pgd", "fgsm", "edge"]
DatasetName = Literal["fashion-mnist", "cifar10", "imagenet", "synthetic"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["cosine", "none"]
OnNonfinite = Literal["stop", "skip"]
PenaltyNorm = Literal["l1", "l2"]  # the norm GradNorm penalizes
InputNoise = Literal["none", "gaussian", "uniform", "pgd"]  # where GradNorm takes the gradient
FDScheme = Literal["forward", "central"]  # gradnorm-fd's finite difference
FDPrecision = Literal["float32", "autocast"]  # what gradnorm-fd's passes run in
EdgeStudent = Literal["class", "loss", "saliency"]
EdgeTeacher = Literal["energy", "magnitude"]
EdgeCosine = Literal["per_image", "batch"]
# how a double backward runs through convolutions: natgrad's functions on the convolution kernels, or autograd's own
DoubleBackward = Literal["natgrad", "autograd"]
AttackForm = Literal["natgrad", "code"]  # PGD training's attack: input gradients only, or as the authors' code runs it
EdgeForm = Literal["paper", "code"]  # edge regularization as the paper writes it, or as the authors' code computes it
Analysis = Literal["gradients", "edges", "geometry", "linearity", "along_attack", "pictures"]
MixupMode = Literal["batch", "pair", "elem"]
EraseMode = Literal["const", "rand", "pixel"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"]

METHODS: tuple[Method, ...] = get_args(Method)
DOUBLE_BACKPROP: tuple[Method, ...] = ("gradnorm", "edge")  # their losses hold an input gradient's graph
DATASETS: tuple[DatasetName, ...] = get_args(DatasetName)
DEVICES: tuple[Device, ...] = get_args(Device)
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
ON_NONFINITE: tuple[OnNonfinite, ...] = get_args(OnNonfinite)
GRADNORM_NORMS: tuple[PenaltyNorm, ...] = get_args(PenaltyNorm)
INPUT_NOISES: tuple[InputNoise, ...] = get_args(InputNoise)
FD_SCHEMES: tuple[FDScheme, ...] = get_args(FDScheme)
FD_PRECISIONS: tuple[FDPrecision, ...] = get_args(FDPrecision)
EDGE_STUDENTS: tuple[EdgeStudent, ...] = get_args(EdgeStudent)
EDGE_TEACHERS: tuple[EdgeTeacher, ...] = get_args(EdgeTeacher)
EDGE_COSINES: tuple[EdgeCosine, ...] = get_args(EdgeCosine)
EDGE_FORMS: tuple[EdgeForm, ...] = get_args(EdgeForm)
ATTACK_FORMS: tuple[AttackForm, ...] = get_args(AttackForm)
DOUBLE_BACKWARDS: tuple[DoubleBackward, ...] = get_args(DoubleBackward)
ANALYSES: tuple[Analysis, ...] = get_args(Analysis)
MIXUP_MODES: tuple[MixupMode, ...] = get_args(MixupMode)
ERASE_MODES: tuple[EraseMode, ...] = get_args(EraseMode)
INTERPOLATIONS: tuple[Interpolation, ...] = get_args(Interpolation)

TrainMode = Literal["train", "eval"]
TRAIN_MODES: tuple[TrainMode, ...] = get_args(TrainMode)

# natgrad's own nets (natgrad.models.BUILTIN); every other model name is timm's.
BUILTIN_NETS = ("cnn-small", "preact-resnet18")
