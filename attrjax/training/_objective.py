"""Training objectives as composable loss terms.

A loss term is a scalar function of what one train step computes, times its weight: the student's logits and, for
a term that needs one, the teacher's; the labels; and both networks' activations and gradients at the layers the
term names. The step linearises each network once, at the union of the layers its terms name (one forward pass,
and one backward pass for all layers; ``attrjax.models.SplitModel.linearize_layers``), hands every term the same
``TermInputs`` and minimises ``sum(term.weight * term(inputs))``. Each term's value is logged under its ``name``.

Terms: ``TaskLoss`` (labels only), ``DistillationLoss`` (KD against the teacher's logits),
``AttributionMatching`` (the teacher's and the student's maps at a layer, with any ``AttributionMap``:
``gradcam_map``, ``activation_map`` or a function of your own) and ``PropagationMatching`` (their LRP or Excitation
Backprop maps, at the input by default, differentiated through the propagation rules). ``Objective`` builds the
paper's settings from a few fields; a list of terms composes anything else, e.g. matching at two layers::

    terms = [DistillationLoss(),
             AttributionMatching("layer3", weight=50.0, name="matching_loss/layer3"),
             AttributionMatching("layer4", weight=50.0, name="matching_loss/layer4")]
    train(student, variables, tx, terms, batches, num_steps, teacher=teacher, ...)
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from attrjax import _distill as distill, _matching as matching
from attrjax.attribution import activation_collapse, excitation_backprop, lrp, top1_target, weighted_collapse
from attrjax.attribution._rules import Composite, resolve_composite

# (activations A (B,H,W,C), gradients dT/dA (B,H,W,C) of the attributed target T) -> maps (B,H,W)
AttributionMap = Callable[[jax.Array, jax.Array], jax.Array]
LABEL_KINDS = ("multilabel", "single")
KD_KINDS = ("binary", "softmax")
# The paper's 'swa' (ours) and 'ewa' (AT-like baseline), and LRP maps at the input (PropagationMatching).
MATCHING_KINDS = ("weighted", "activation", "lrp")
PROPAGATION_METHODS: dict[str, Callable[..., jax.Array]] = {"lrp": lrp, "ebp": excitation_backprop}


def gradcam_map(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """The weighted collapsed map (Grad-CAM): channels weighted by their spatially summed gradients, ReLU."""
    return weighted_collapse(activations, jnp.sum(gradients, axis=(1, 2)))


def activation_map(activations: jax.Array, gradients: jax.Array) -> jax.Array:
    """The unweighted collapsed map mean_c A^2 (attention transfer); the gradients are not used."""
    del gradients
    return activation_collapse(activations)


class NetworkOutputs(NamedTuple):
    """What one network computed in a step.

    ``gradients`` are those of the step's attribution target: the teacher's top-1 class (the student is attributed
    to the teacher's class too), or the student's own top-1 class without a teacher. ``vjp`` gives them for any
    other target. Under ``jax.jit`` what no term reads is never computed.
    """

    logits: jax.Array  # (B,K)
    activations: Mapping[str, jax.Array]  # layer -> A (B,H,W,C), for the layers the terms name
    gradients: Mapping[str, jax.Array]  # layer -> d(target . logits)/dA (B,H,W,C)
    vjp: Callable[[jax.Array], Mapping[str, jax.Array]] | None  # cotangent (B,K) -> layer -> gradients
    model: Any = None  # the network (a split model) ...
    variables: Any = None  # ... and its eval-mode variables (the student's: parameters and running statistics)


class TermInputs(NamedTuple):
    """What every loss term of one step sees: the batch and both networks' outputs."""

    labels: jax.Array  # (B,K) multi-hot or one-hot, or (B,) int
    images: jax.Array  # (B,S,S,3)
    student: NetworkOutputs
    teacher: NetworkOutputs | None  # None when no term needs a teacher
    rng: jax.Array  # this term's own key for this step


class LossTerm(abc.ABC):
    """One term of an objective. Subclasses are frozen dataclasses with a ``name`` and a ``weight`` field."""

    name: str
    weight: float

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers whose activations and gradients the term reads (in both networks)."""
        return ()

    @property
    def needs_teacher(self) -> bool:
        return False

    @abc.abstractmethod
    def __call__(self, inputs: TermInputs) -> jax.Array:
        """The term's () value, before its weight."""

    @abc.abstractmethod
    def divergence_hint(self, first_step_of_run: bool) -> str:
        """What to change when this term is the first to go non-finite."""

    def record(self) -> dict:
        """The term as JSON-compatible settings (functions by their qualified name), for run records."""
        fields = {field.name: getattr(self, field.name)
                  for field in dataclasses.fields(self)}  # type: ignore[arg-type]  # subclasses are dataclasses
        return {"term": type(self).__name__,
                **{key: _function_name(value) if callable(value) else value for key, value in fields.items()}}

    def _check_weight(self):
        if not isinstance(self.weight, numbers.Real) or isinstance(self.weight, bool) or not self.weight >= 0:
            raise ValueError(f"the weight of loss term {self.name!r} must be a number >= 0, got {self.weight!r}")


def check_labels(labels, logits_shape: tuple[int, ...], kind: str) -> None:
    """Raises ValueError unless ``labels`` fit logits (B,K): ``multilabel`` labels are (B,K) exactly (multi-hot,
    never broadcast), ``single`` labels (B,) integer class indices or (B,K) one-hot. Reads shapes and dtypes only."""
    shape, integer = tuple(labels.shape), jnp.issubdtype(labels.dtype, jnp.integer)
    if shape == tuple(logits_shape) or (kind == "single" and integer and shape == tuple(logits_shape[:1])):
        return
    expected = "(B, K) multi-hot" if kind == "multilabel" else "(B,) integer class indices or (B, K) one-hot"
    hint = ""
    if kind == "multilabel" and integer and len(shape) == 1:
        hint = (f"; these look like class indices: one-hot them (jax.nn.one_hot(labels, {logits_shape[-1]}), or "
                f"np.eye({logits_shape[-1]})[labels]), or train with single labels (labels='single', kd='softmax')")
    raise ValueError(f"{kind} labels must be {expected} for logits {tuple(logits_shape)} (B, K), got labels of "
                     f"shape {shape} and dtype {labels.dtype}{hint}")


def _function_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _first_step_hint(settings: str) -> str:
    return (f"the task loss is non-finite on the run's first step, so a setting is wrong rather than the training "
            f"diverging: check the labels and the loss settings ({settings})")


OVERFLOW_HINT = ("the student's logits overflowed (the task loss went non-finite first): lower the learning rate, or "
                 "add warm-up or gradient clipping")


@dataclasses.dataclass(frozen=True)
class TaskLoss(LossTerm):
    """The supervised loss: multi-label soft margin (``multilabel`` labels (B,K) multi-hot) or softmax cross-entropy
    (``single`` labels, (B,) int or (B,K) one-hot)."""

    labels: str = "multilabel"
    weight: float = 1.0
    name: str = "task_loss"

    def __post_init__(self):
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}, got {self.labels!r}")
        self._check_weight()

    def __call__(self, inputs):
        check_labels(inputs.labels, inputs.student.logits.shape, self.labels)
        if self.labels == "single":
            return distill.softmax_cross_entropy(inputs.student.logits, inputs.labels)
        return distill.multilabel_soft_margin_loss(inputs.student.logits, inputs.labels)

    def divergence_hint(self, first_step_of_run):
        return _first_step_hint(f"{self.labels} labels") if first_step_of_run else OVERFLOW_HINT


@dataclasses.dataclass(frozen=True)
class DistillationLoss(LossTerm):
    """Knowledge distillation from the teacher's logits, mixed with the labels: ``binary`` (per-class Bernoulli KD
    with the multi-label loss) or ``softmax`` (Hinton KD with cross-entropy); see ``attrjax._distill``."""

    kind: str = "binary"
    temperature: float = 4.0
    alpha: float = 0.9  # the weight of the teacher's soft targets against the labels
    weight: float = 1.0
    name: str = "task_loss"

    def __post_init__(self):
        if self.kind not in KD_KINDS:
            raise ValueError(f"kd must be one of {KD_KINDS}, got {self.kind!r}")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"the KD temperature must be a finite number > 0 (the paper's and Hinton's value is 4), "
                             f"got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd_alpha (the weight of the teacher's soft targets against the labels) must lie in "
                             f"[0, 1], got {self.alpha}")
        self._check_weight()

    @property
    def needs_teacher(self):
        return True

    def __call__(self, inputs):
        check_labels(inputs.labels, inputs.student.logits.shape, "multilabel" if self.kind == "binary" else "single")
        loss = distill.binary_kd_loss if self.kind == "binary" else distill.softmax_kd_loss
        return loss(inputs.student.logits, inputs.teacher.logits, inputs.labels, temperature=self.temperature,
                    alpha=self.alpha)

    def divergence_hint(self, first_step_of_run):
        settings = f"{self.kind} KD, temperature {self.temperature}, kd_alpha {self.alpha}"
        return _first_step_hint(settings) if first_step_of_run else OVERFLOW_HINT


@dataclasses.dataclass(frozen=True)
class AttributionMatching(LossTerm):
    """The attribution-matching loss at ``layer`` (docs/method.md#attribution-matching): the mean squared difference
    of the teacher's and the student's L2-normalised maps, both for the step's attribution target.

    Attributes:
      layer: a layer of both networks; their maps there must have the same spatial size.
      weight: lambda.
      attribution: the map of activations and gradients, ``gradcam_map`` (the paper's), ``activation_map`` or your
        own ``(A (B,H,W,C), dT/dA (B,H,W,C)) -> (B,H,W)``.
      drop_rate: stochastic matching (docs/method.md#stochastic-matching): each step the teacher's map is computed
        from a random subset of its channels, this fraction of them dropped (activations and gradients zeroed).
    """

    layer: str
    weight: float = 1.0
    attribution: AttributionMap = gradcam_map
    drop_rate: float = 0.0
    name: str = "matching_loss"

    def __post_init__(self):
        if not callable(self.attribution):
            raise TypeError(f"attribution must be a function (activations, gradients) -> maps, got "
                            f"{type(self.attribution).__name__}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {self.drop_rate}")
        self._check_weight()

    @property
    def layers(self):
        return (self.layer,)

    @property
    def needs_teacher(self):
        return True

    def __call__(self, inputs):
        teacher_activations = inputs.teacher.activations[self.layer]
        teacher_gradients = inputs.teacher.gradients[self.layer]
        if self.drop_rate:
            keep = matching.stochastic_channel_keep(inputs.rng, teacher_activations.shape[-1], self.drop_rate)
            teacher_activations, teacher_gradients = teacher_activations * keep, teacher_gradients * keep
        teacher_maps = jax.lax.stop_gradient(self.attribution(teacher_activations, teacher_gradients))
        student_maps = self.attribution(inputs.student.activations[self.layer], inputs.student.gradients[self.layer])
        if teacher_maps.shape != student_maps.shape:
            raise ValueError(f"maps at {self.layer!r} are {teacher_maps.shape[1:]} in the teacher but "
                             f"{student_maps.shape[1:]} in the student: match at a layer where both have the same "
                             "spatial size")
        return matching.matching_loss(teacher_maps, student_maps)

    def divergence_hint(self, first_step_of_run):
        del first_step_of_run
        return (f"the matching loss {self.name!r} went non-finite first: lower its weight (now {self.weight}) or the "
                "learning rate")


@dataclasses.dataclass(frozen=True)
class PropagationMatching(LossTerm):
    """The matching loss on propagation maps: the teacher's and the student's LRP (or Excitation Backprop) maps at
    ``layer`` (the input by default), for the step's attribution target, L2-normalised and compared as in
    ``AttributionMatching``.

    Both maps are those of the eval-mode networks (the student's parameters with its running BatchNorm statistics:
    the network that is deployed and explained), while the task and distillation terms see the train-mode pass.
    The loss is differentiated through the propagation rules: the relevance is a piecewise smooth function of the
    parameters (the rules' ratios and products; activations pass relevance unchanged and max-pools route it by
    their arg-max), so its gradient is exact wherever no arg-max or sign changes, with no surrogate.

    Attributes:
      method: ``lrp`` or ``ebp``.
      layer: ``input`` or a layer of both networks with the same spatial size in both.
      weight: lambda.
      composite: the rules, a preset name (``attrjax.attribution.COMPOSITES``) or a ``Composite``; Excitation
        Backprop uses its own (``excitation_backprop``) unless one is given.
    """

    method: str = "lrp"
    layer: str = "input"
    weight: float = 1.0
    composite: str | Composite | None = None
    name: str = "matching_loss"

    def __post_init__(self):
        if self.method not in PROPAGATION_METHODS:
            raise ValueError(f"method must be one of {tuple(PROPAGATION_METHODS)}, got {self.method!r}")
        if self.composite is not None:
            resolve_composite(self.composite)
        self._check_weight()

    @property
    def needs_teacher(self):
        return True

    def maps(self, network: NetworkOutputs, images: jax.Array, target: jax.Array) -> jax.Array:
        """(B,H,W) maps of ``network`` at ``layer`` by this term's method, for (B,) target classes."""
        options = {} if self.composite is None else {"composite": self.composite}
        return PROPAGATION_METHODS[self.method](network.model, network.variables, images, target, layer=self.layer,
                                                **options)

    def __call__(self, inputs):
        target = top1_target(inputs.teacher.logits)
        teacher_maps = jax.lax.stop_gradient(self.maps(inputs.teacher, inputs.images, target))
        return matching.matching_loss(teacher_maps, self.maps(inputs.student, inputs.images, target))

    def divergence_hint(self, first_step_of_run):
        del first_step_of_run
        return (f"the {self.method} matching loss {self.name!r} went non-finite first: lower its weight (now "
                f"{self.weight}) or the learning rate")

    def record(self) -> dict:
        record = super().record()
        if isinstance(self.composite, Composite):
            record["composite"] = repr(self.composite)
        return record


@dataclasses.dataclass(frozen=True)
class Objective:
    """The paper's objectives in a few fields; ``terms()`` gives the loss terms they stand for.

    Attributes:
      labels: ``multilabel`` (labels (B,K) multi-hot, soft-margin loss) or ``single`` (labels (B,) int or (B,K) one-hot,
        softmax CE).
      kd: None, ``binary`` (per-class Bernoulli KD) or ``softmax`` (Hinton KD); replaces the task loss.
      temperature, kd_alpha: KD's T and alpha.
      matching: None, ``weighted`` (weighted collapsed attribution matching), ``activation`` (unweighted) or ``lrp``
        (the paper's LRP maps at the input, ``PropagationMatching``; ``matching_layer`` is then not used).
      matching_weight: lambda.
      matching_layer: the layer both networks are matched at (must have the same spatial size in both).
      drop_rate: stochastic matching: fraction of teacher channels dropped from its map each step (0 = off).
    """

    labels: str = "multilabel"
    kd: str | None = None
    temperature: float = 4.0
    kd_alpha: float = 0.9
    matching: str | None = None
    matching_weight: float = 0.0
    matching_layer: str = "pool5"
    drop_rate: float = 0.0

    def __post_init__(self):
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}, got {self.labels!r}")
        if self.kd not in (None,) + KD_KINDS:
            raise ValueError(f"kd must be None or one of {KD_KINDS}, got {self.kd!r}")
        if self.matching not in (None,) + MATCHING_KINDS:
            raise ValueError(f"matching must be None or one of {MATCHING_KINDS}, got {self.matching!r}")
        if self.drop_rate and self.matching != "weighted":
            raise ValueError("stochastic matching (drop_rate > 0) needs matching='weighted'")
        if not self.matching_weight >= 0:  # also rejects NaN
            raise ValueError(f"matching_weight must be >= 0, got {self.matching_weight}")
        self.terms()  # each term checks its own settings

    @property
    def needs_teacher(self) -> bool:
        return self.kd is not None or self.matching is not None

    def terms(self) -> tuple[LossTerm, ...]:
        """The loss terms these fields describe: the task or KD loss, then the matching term if any."""
        task = DistillationLoss(self.kd, self.temperature, self.kd_alpha) if self.kd else TaskLoss(self.labels)
        if not self.matching:
            return (task,)
        if self.matching == "lrp":
            return task, PropagationMatching("lrp", "input", self.matching_weight)
        attribution = gradcam_map if self.matching == "weighted" else activation_map
        return task, AttributionMatching(self.matching_layer, self.matching_weight, attribution, self.drop_rate)


def as_terms(objective: Objective | Sequence[LossTerm]) -> tuple[LossTerm, ...]:
    """The loss terms of an ``Objective`` or of a sequence of terms, checked: at least one, names unique."""
    terms = objective.terms() if isinstance(objective, Objective) else tuple(objective)
    if not terms or not all(isinstance(term, LossTerm) for term in terms):
        raise TypeError(f"an objective is an attrjax.training.Objective or a non-empty sequence of loss terms "
                        f"(TaskLoss, DistillationLoss, AttributionMatching, PropagationMatching, ...), got "
                        f"{objective!r}")
    names = [term.name for term in terms]
    clashes = sorted({name for name in names if names.count(name) > 1 or name == "loss" or name.endswith("_finite")})
    if clashes:
        raise ValueError(f"loss term names must be unique, not 'loss' and not end in '_finite' (they name the logged "
                         f"metrics); rename {clashes} with name=")
    return terms


def objective_record(objective: Objective | Sequence[LossTerm]) -> dict:
    """The objective as JSON-compatible settings for a run record."""
    if isinstance(objective, Objective):
        return dataclasses.asdict(objective)
    return {"terms": [term.record() for term in as_terms(objective)]}
