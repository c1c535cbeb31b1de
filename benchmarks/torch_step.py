"""A PyTorch transcription of the paper's train step, the baseline that ``benchmarks.train_step --pytorch`` times in
the same run as ours.

The step is written the way the reference PyTorch code does it, with eager autograd:
  teacher (eval mode): activations A_T at the matching layer, logits, the top-1 one-hot g, dz_g/dA_T by
    ``torch.autograd.grad``, the weighted collapsed map M_T = ReLU(sum_k alpha_k A_T[k]), alpha the spatial sums
    of the gradient, detached;
  student (train mode): the same, with ``create_graph=True`` so that M_S is differentiable (double backprop);
  loss = binary KD (T = 4, alpha = 0.9) + lambda * mean((N(M_T) - N(M_S))^2), N the per-sample L2 normalisation;
  backward and one SGD step (momentum 0.9, coupled weight decay 1e-4).
The teacher's trunk runs under ``torch.no_grad`` (only its head needs a graph for dz/dA_T), which is faster than
the reference code's full teacher graph: the speed-up we report over this step is a lower bound.

``torch`` is an optional benchmark dependency (the ``pytorch-baseline`` extra; its CPU build from
https://download.pytorch.org/whl/cpu), never needed by the library or its tests.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("benchmarks.torch_step needs PyTorch: pip install '.[pytorch-baseline]' "
                      "--extra-index-url https://download.pytorch.org/whl/cpu") from error

from attrjax.models import VGG

LOG_EPS = 1e-7


class TorchVGG(nn.Module):
    """attrjax's VGG (conv3x3 + BatchNorm + ReLU stages, 2x2 max-pools, dropout + linear head on the C,H,W
    flatten) in PyTorch's NCHW layout, with the same layer names."""

    def __init__(self, model: VGG):
        super().__init__()
        self.layer_names = model.layers
        self.convs, self.norms = nn.ModuleDict(), nn.ModuleDict()
        in_channels = 3
        for stage, widths in enumerate(model.stage_widths, start=1):
            for index, width in enumerate(widths, start=1):
                key = f"{stage}_{index}"
                self.convs[key] = nn.Conv2d(in_channels, width, 3, padding=1)
                self.norms[key] = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
                in_channels = width
        self.dropout = nn.Dropout(model.dropout_rate)
        self.classifier = nn.Linear(in_channels * model.final_spatial_size**2, model.num_classes)

    def _point(self, name: str, x):
        if name.startswith("pool"):
            return F.max_pool2d(x, 2)
        key = name[4:]
        return F.relu(self.norms[key](self.convs[key](x)))

    def features(self, x, layer: str):
        """Images (B,3,S,S) -> activations (B,C,H,W) at ``layer``."""
        for name in self.layer_names[1:self.layer_names.index(layer) + 1]:
            x = self._point(name, x)
        return x

    def head(self, a, layer: str):
        """Activations at ``layer`` -> logits (B,K)."""
        for name in self.layer_names[self.layer_names.index(layer) + 1:]:
            a = self._point(name, a)
        return self.classifier(self.dropout(torch.flatten(a, 1)))


def load_flax_variables(module: TorchVGG, variables) -> TorchVGG:
    """Copies a Flax VGG's ``{"params", "batch_stats"}`` into ``module`` (HWIO kernels -> OIHW; the dense kernel
    (C*H*W, K) -> (K, C*H*W), both flattening C,H,W)."""
    params, stats = variables["params"], variables["batch_stats"]
    as_tensor = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    with torch.no_grad():
        for key, conv in module.convs.items():
            conv.weight.copy_(as_tensor(params[f"conv{key}"]["kernel"]).permute(3, 2, 0, 1))
            conv.bias.copy_(as_tensor(params[f"conv{key}"]["bias"]))
            norm = module.norms[key]
            norm.weight.copy_(as_tensor(params[f"bn{key}"]["scale"]))
            norm.bias.copy_(as_tensor(params[f"bn{key}"]["bias"]))
            norm.running_mean.copy_(as_tensor(stats[f"bn{key}"]["mean"]))
            norm.running_var.copy_(as_tensor(stats[f"bn{key}"]["var"]))
        module.classifier.weight.copy_(as_tensor(params["classifier"]["kernel"]).T)
        module.classifier.bias.copy_(as_tensor(params["classifier"]["bias"]))
    return module


def weighted_collapsed_map(activations, gradients):
    """(B,C,H,W) activations and gradients -> ReLU(sum_k alpha_k A[k]) (B,H*W), alpha = spatial sums."""
    alpha = gradients.sum(dim=(2, 3))
    return F.relu(torch.einsum("bchw,bc->bhw", activations, alpha)).flatten(1)


def binary_kd_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9):
    q = torch.sigmoid(teacher_logits / temperature)
    p = torch.sigmoid(student_logits / temperature)
    kl = (torch.xlogy(q, q) - q * torch.log(p + LOG_EPS) + torch.xlogy(1 - q, 1 - q)
          - (1 - q) * torch.log(1 - p + LOG_EPS))
    return alpha * temperature**2 * kl.mean() + (1 - alpha) * F.multilabel_soft_margin_loss(student_logits, labels)


def matching_loss(teacher_maps, student_maps):
    return (F.normalize(teacher_maps, dim=1) - F.normalize(student_maps, dim=1)).square().mean()


def loss(teacher: TorchVGG, student: TorchVGG, images, labels, layer: str, matching_weight: float):
    """The KD + matching loss of one batch (images (B,3,S,S), labels (B,K) multi-hot), differentiable w.r.t. the
    student's parameters."""
    teacher.eval()
    student.train()
    with torch.no_grad():
        teacher_activations = teacher.features(images, layer)
    teacher_activations.requires_grad_(True)
    teacher_logits = teacher.head(teacher_activations, layer)
    target = F.one_hot(teacher_logits.argmax(dim=1), teacher_logits.shape[1]).to(teacher_logits.dtype)
    (teacher_gradients,) = torch.autograd.grad((teacher_logits * target).sum(), teacher_activations)
    teacher_maps = weighted_collapsed_map(teacher_activations.detach(), teacher_gradients)
    teacher_logits = teacher_logits.detach()

    student_activations = student.features(images, layer)
    student_logits = student.head(student_activations, layer)
    (student_gradients,) = torch.autograd.grad((student_logits * target).sum(), student_activations,
                                               create_graph=True)
    student_maps = weighted_collapsed_map(student_activations, student_gradients)
    return (binary_kd_loss(student_logits, teacher_logits, labels)
            + matching_weight * matching_loss(teacher_maps, student_maps))


def make_step(teacher_model: VGG, student_model: VGG, teacher_variables, student_variables, images: np.ndarray,
              labels: np.ndarray, *, layer: str, matching_weight: float = 100.0, learning_rate: float = 0.01):
    """A thunk running one PyTorch train step on a fixed batch (images (B,S,S,3) NHWC, as ours), and the modules.

    The networks start from the given Flax variables, so both frameworks step the same weights.
    """
    teacher = load_flax_variables(TorchVGG(teacher_model), teacher_variables)
    student = load_flax_variables(TorchVGG(student_model), student_variables)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=learning_rate, momentum=0.9, weight_decay=1e-4)
    images_nchw = torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))
    labels_t = torch.from_numpy(np.asarray(labels, np.float32))

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss(teacher, student, images_nchw, labels_t, layer, matching_weight)
        value.backward()
        optimizer.step()
        return value.detach()

    return step, (teacher, student)


def first_step_gradients(teacher_model: VGG, student_model: VGG, teacher_variables, student_variables,
                         images: np.ndarray, labels: np.ndarray, *, layer: str,
                         matching_weight: float = 100.0) -> tuple[float, dict[str, np.ndarray]]:
    """The loss of one batch and its gradient w.r.t. the student's kernels, in Flax's names and layouts
    (``{"conv1_1": HWIO, ..., "classifier": (C*H*W, K)}``): for checking that this transcription computes what
    attrjax's step computes (with dropout off, so that neither draws a mask)."""
    teacher = load_flax_variables(TorchVGG(teacher_model), teacher_variables)
    student = load_flax_variables(TorchVGG(student_model), student_variables)
    images_nchw = torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))
    value = loss(teacher, student, images_nchw, torch.from_numpy(np.asarray(labels, np.float32)), layer,
                 matching_weight)
    value.backward()
    gradients = {f"conv{key}": conv.weight.grad.permute(2, 3, 1, 0).numpy() for key, conv in student.convs.items()}
    gradients["classifier"] = student.classifier.weight.grad.T.numpy()
    return float(value.detach()), gradients
