"""Parameter and FLOP counts read off the jaxpr: VGG (the analytic counts), a user's linen CNN, a ResNet, NNX and
plain functions, all checked against hand counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attrjax.models import resnet18, resnet_small, vgg
from attrjax.pruning import apply_masks, count_params_and_flops, magnitude_masks


def _abstract(model, image_size):
    """The variables' shapes only, and one image."""
    images = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images)), images


@pytest.mark.parametrize("layout, kwargs, params, flops", [
    # VGG16 at 227 px, 20 classes: 15.2 M parameters, 30.9 GFLOP (the numbers docs/reproduction.md quotes).
    ("vgg16", dict(num_classes=20, image_size=227), 15_224_916, 30_898_227_584),
    ("vgg16", dict(num_classes=20, image_size=64), 14_764_116, 2_505_654_272),
    ("vgg11", dict(num_classes=5, image_size=32, head_pooling="avg"), 9_228_549, 305_533_952),
    # The demo's teacher: 97.9 MFLOPs.
    ("vgg16_s3", dict(num_classes=6, image_size=64, width_divisor=4, head_pooling="avg"), 109_974, 97_911_552),
])
def test_vgg_counts_are_the_analytic_ones(layout, kwargs, params, flops):
    """The numbers of the analytic VGG counter this one replaced: sum over convs of 2 * H * W * 9 * C_in * C_out
    (padded taps included) plus 2 * features * classes, and every parameter but the BatchNorm statistics."""
    model = vgg(layout, **kwargs)
    variables, images = _abstract(model, kwargs["image_size"])
    assert count_params_and_flops(model, variables, images) == {"params": params, "flops": flops}


class _TinyCNN(nn.Module):
    """A user's linen CNN without a ``train`` argument: 6x6x3 -> conv 3x3 SAME (4) -> conv 3x3 stride 2 VALID (5,
    2x2 out) -> flatten (20) -> dense (3)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding="VALID", name="conv2")(x))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_a_linen_cnn_by_hand():
    model = _TinyCNN()
    images = jnp.zeros((7, 6, 6, 3))  # a batch: the counts are of one image
    variables = model.init(jax.random.key(0), images)
    dense = count_params_and_flops(model, variables, images)
    assert dense["params"] == (108 + 4) + (180 + 5) + (60 + 3)
    # conv1: 36 output positions (the padded border taps counted) x 108 weights; conv2: 4 x 180; fc: 60.
    assert dense["flops"] == 2 * (36 * 108 + 4 * 180 + 60)
    assert count_params_and_flops(model.apply, variables, images) == dense  # the apply function alike
    params = jax.tree.map(np.array, variables["params"])
    params["conv1"]["kernel"][0, :, :, :] = 0.0  # 36 of 108
    params["conv2"]["kernel"][..., 0] = 0.0  # 36 of 180
    params["fc"]["kernel"][:7] = 0.0  # 21 of 60
    params["conv1"]["bias"][:] = 0.0  # a zero bias is still a parameter
    sparse = count_params_and_flops(model, {"params": params}, images)
    assert sparse["params"] == dense["params"] - 36 - 36 - 21
    assert sparse["flops"] == 2 * (36 * 72 + 4 * 144 + 39)


def test_a_small_resnet_by_hand():
    """resnet_small, width 4, stages (1, 1), 8 px, 3 classes. Stem conv 3x3 3->4 at 8x8; layer1.0 (no downsample):
    two 3x3 4->4 convs at 8x8; layer2.0: 3x3 stride 2 4->8 (4x4 out), 3x3 8->8 at 4x4 and the 1x1 stride-2
    downsample 4->8; fc 8->3 after the global average. Convs have no bias; each BatchNorm has 2 x C parameters."""
    model = resnet_small(3, stage_sizes=(1, 1), width_divisor=4)
    variables, images = _abstract(model, 8)
    counted = count_params_and_flops(model, variables, images)
    stem, layer1, layer2, fc = 108 + 8, (144 + 8) * 2, (288 + 16) + (576 + 16) + (32 + 16), 24 + 3
    assert counted["params"] == stem + layer1 + layer2 + fc
    assert counted["flops"] == 2 * (64 * 108 + 2 * 64 * 144 + 16 * 288 + 16 * 576 + 16 * 32 + 24)


def test_resnet18_at_224_is_torchvisions():
    """torchvision's ResNet-18: 11,689,512 parameters and 1.81 G multiply-adds. By hand: conv1 7x7x3x64 at
    112x112, layer1 four 3x3x64x64 at 56x56, then per stage a strided 3x3 C->2C, three 3x3 2C->2C and a 1x1 C->2C
    downsample at the halved size, and fc 512x1000."""
    model = resnet18(1000)
    variables, images = _abstract(model, 224)
    counted = count_params_and_flops(model, variables, images)
    assert counted["params"] == 11_689_512
    stages = sum(s * s * (9 * c * 2 * c + 3 * 9 * 4 * c * c + 2 * c * c) for s, c in ((28, 64), (14, 128), (7, 256)))
    macs = 112 * 112 * 49 * 3 * 64 + 4 * 56 * 56 * 9 * 64 * 64 + stages + 512 * 1000
    assert macs == 1_814_073_344
    assert counted["flops"] == 2 * macs


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.oldest
def test_a_plain_function_through_jit_and_scan():
    """stax-style params: a jitted conv 3->4, a scan over three stacked 3x3 4->4 convs (each sparse its own way), a
    dense layer whose weight is a product of two factors (computed from the params only: not counted)."""
    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(3, 3, 3, 4, 4)).astype(np.float32)
    stacked[0, 0, 0] = 0.0  # 16 zeros in layer 0
    stacked[2, :, 0, 0] = 0.0  # 12 + 16 zeros in layer 2
    stacked[2, 0, 2] = 0.0
    params = {"first": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
              "blocks": {"kernel": jnp.asarray(stacked)},
              "head": {"u": jnp.ones((4, 2)), "v": jnp.ones((2, 5))}}

    def forward(params, images):
        x = jax.jit(_conv)(images, params["first"]["kernel"])
        x, _ = jax.lax.scan(lambda h, kernel: (jax.nn.relu(_conv(h, kernel)), None), x, params["blocks"]["kernel"])
        return x.mean(axis=(1, 2)) @ (params["head"]["u"] @ params["head"]["v"])

    images = jnp.zeros((2, 5, 5, 3))
    counted = count_params_and_flops(forward, params, images)
    assert counted["params"] == 108 + (432 - 16 - 28) + 8 + 10
    # 25 output positions per conv; the head's 4x5 weight is computed, and fully non-zero.
    assert counted["flops"] == 2 * (25 * 108 + 25 * (144 - 16) + 25 * 144 + 25 * (144 - 28) + 4 * 5)



def test_remat_custom_vjp_and_a_depthwise_conv():
    """A rematerialised conv 3->4, then a depthwise 3x3 conv (4 groups) inside a custom_vjp, at 5x5: each conv
    costs its non-zero weights once per output position."""

    @jax.custom_vjp
    def depthwise(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=4)

    depthwise.defvjp(lambda x, kernel: (depthwise(x, kernel), None), lambda _, g: (g, None))
    params = {"conv": jnp.ones((3, 3, 3, 4)), "depthwise": jnp.ones((3, 3, 1, 4)).at[0].set(0.0)}  # 12 zeros

    def forward(params, images):
        return depthwise(jax.checkpoint(_conv)(images, params["conv"]), params["depthwise"])

    counted = count_params_and_flops(forward, params, jnp.zeros((1, 5, 5, 3)))
    assert counted == {"params": 108 + 36 - 12, "flops": 2 * 25 * (108 + 24)}

class _NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def test_an_nnx_model_through_its_state():
    model = _NNXCNN(nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = apply_masks(params, magnitude_masks(params, 0.5))
    nonzero = int(np.count_nonzero(np.asarray(params["conv"]["kernel"].value)))
    counted = count_params_and_flops(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, jnp.zeros((1, 6, 6, 3)))
    assert counted["params"] == nonzero + 4 + 8 + 10
    assert counted["flops"] == 2 * (36 * nonzero + 8)


def test_convs_in_a_loop_without_a_static_trip_count_are_refused():
    kernel = jnp.ones((3, 3, 3, 3))

    def forward(kernel, images):
        return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, _conv(c[1], kernel)), (0, images))[1]

    with pytest.raises(ValueError, match="while"):
        count_params_and_flops(forward, kernel, jnp.zeros((1, 4, 4, 3)))

