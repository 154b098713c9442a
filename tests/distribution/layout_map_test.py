"""The expert layout rules, on every backend (no devices needed)."""

import re

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.distribution import layouts as layout_rules

DEVICES = [f"cpu:{i}" for i in range(8)]


def mesh(shape=(2, 4), names=("batch", "expert")):
    return keras.distribution.DeviceMesh(shape, list(names), devices=DEVICES)


def layouts_of(model, **kwargs):
    layouts = keras_moe.distribution.layout_map(mesh(**kwargs.pop("mesh_kwargs", {})), **kwargs)
    # A path matching two keys raises here: the rules must not overlap.
    return {v.path: (None if layouts[v.path] is None else layouts[v.path].axes) for v in model.variables}


def moe_model():
    inputs = keras.Input((4, 8))
    h = keras_moe.layers.SparseMoE(
        8, 16, gated=True, use_bias=True, shared_intermediate_dim=12,
        shared_expert_gate=True, router_bias=True, name="sparse",
    )(inputs)
    h = keras_moe.layers.SwitchFFN(4, 16, use_bias=True, name="switch")(h)
    h = keras_moe.layers.MoE(
        router=keras_moe.routers.TopKRouter(num_experts=4, top_k=1),
        experts=keras_moe.experts.StackedExperts(num_experts=4, intermediate_dim=8),
        name="core",
    )(h)
    return keras.Model(inputs, h)


def test_every_stacked_expert_variable_is_sharded_and_nothing_else():
    # Another StackedExperts first: the model's gets a numbered automatic
    # name, `stacked_experts_<n>`.
    keras_moe.experts.StackedExperts(2, 4)
    found = layouts_of(moe_model())
    expert_paths = [p for p in found if re.search(r"experts(_\d+)?/(up|gate|down)_(kernel|bias)$", p)]
    # SparseMoE: 3 kernels + 3 biases, SwitchFFN: 2 + 2, MoE(StackedExperts): 2.
    assert len(expert_paths) == 12
    assert any(re.search(r"/stacked_experts_\d+/", p) for p in expert_paths)
    for path, axes in found.items():
        if path in expert_paths:
            assert axes is not None and axes[0] == "expert", path
            assert all(a is None for a in axes[1:]), path
        else:
            assert axes is None, path  # routers, expert_bias, statistics, shared expert


def test_model_axis_splits_expert_and_shared_widths():
    found = layouts_of(
        moe_model(), model_axis="model",
        mesh_kwargs={"shape": (2, 2, 2), "names": ("batch", "expert", "model")},
    )
    by_suffix = {}
    for path, axes in found.items():
        if path.startswith("sparse/"):
            by_suffix[path.split("/", 1)[1]] = axes
    assert by_suffix["experts/up_kernel"] == ("expert", None, "model")
    assert by_suffix["experts/gate_kernel"] == ("expert", None, "model")
    assert by_suffix["experts/down_kernel"] == ("expert", "model", None)
    assert by_suffix["experts/up_bias"] == ("expert", "model")
    assert by_suffix["experts/down_bias"] == ("expert", None)
    assert by_suffix["shared_expert/up_kernel"] == (None, "model")
    assert by_suffix["shared_expert/down_kernel"] == ("model", None)
    assert by_suffix["router/kernel"] is None
    assert by_suffix["router/expert_bias"] is None
    assert by_suffix["shared_gate/kernel"] is None


def test_expert_choice_and_soft_moe_experts_are_sharded():
    inputs = keras.Input((4, 8))
    h = keras_moe.layers.ExpertChoiceMoE(8, 16, capacity_factor=2.0, use_bias=True, name="choice")(inputs)
    h = keras_moe.layers.SoftMoE(8, 2, 16, name="soft")(h)
    found = layouts_of(keras.Model(inputs, h))
    sharded = {p for p, axes in found.items() if axes is not None}
    assert sharded == {
        "choice/experts/up_kernel", "choice/experts/down_kernel",
        "choice/experts/up_bias", "choice/experts/down_bias",
        "soft/experts/up_kernel", "soft/experts/down_kernel",
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_moe.layers.MMoE(num_tasks=2, num_experts=4, expert_units=[16, 8], gate_units=[4]),
        lambda: keras_moe.layers.CGC(num_tasks=2, num_task_experts=1, num_shared_experts=2, expert_units=[8]),
        lambda: keras_moe.layers.PLE(
            num_tasks=2, num_levels=2, num_task_experts=1, num_shared_experts=2, expert_units=[8]
        ),
    ],
    ids=["mmoe", "cgc", "ple"],
)
def test_multitask_experts_are_sharded_gates_are_not(make):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, make()(inputs))
    found = layouts_of(model)
    experts = [p for p in found if re.search(r"experts/(kernel|bias)_\d+$", p)]
    assert experts
    for path, axes in found.items():
        if path in experts:
            assert axes[0] == "expert" and all(a is None for a in axes[1:]), path
        else:
            assert axes is None, path


def _keras_hub_backbones():
    from keras_hub.src.models.gemma4.gemma4_backbone import Gemma4Backbone
    from keras_hub.src.models.gpt_oss.gpt_oss_backbone import GptOssBackbone
    from keras_hub.src.models.mixtral.mixtral_backbone import MixtralBackbone
    from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_backbone import Qwen3_5MoeBackbone
    from keras_hub.src.models.qwen3_moe.qwen3_moe_backbone import Qwen3MoeBackbone
    from keras_hub.src.models.qwen_moe.qwen_moe_backbone import QwenMoeBackbone

    common = dict(
        vocabulary_size=16, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, num_experts=4,
    )
    return {
        "mixtral": lambda: MixtralBackbone(intermediate_dim=12, top_k=2, **common),
        "qwen_moe": lambda: QwenMoeBackbone(
            intermediate_dim=12, moe_intermediate_dim=6, shared_expert_intermediate_dim=10,
            top_k=2, **common,
        ),
        "qwen3_moe": lambda: Qwen3MoeBackbone(
            intermediate_dim=12, moe_intermediate_dim=6, head_dim=4, top_k=2, **common
        ),
        "qwen3_5_moe": lambda: Qwen3_5MoeBackbone(
            head_dim=4, moe_intermediate_dim=6, shared_expert_intermediate_size=10, top_k=2,
            layer_types=["full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
            linear_key_head_dim=4, linear_value_head_dim=4, **common,
        ),
        "gpt_oss": lambda: GptOssBackbone(intermediate_dim=12, top_k=2, head_dim=4, **common),
        "gemma4": lambda: Gemma4Backbone(
            vocabulary_size=16, image_size=16, num_layers=1, num_query_heads=2,
            num_key_value_heads=1, hidden_dim=8, intermediate_dim=12, head_dim=4,
            enable_moe_block=True, num_experts=4, expert_intermediate_dim=6,
            num_experts_per_token=2,
        ),
    }


# The expert variables of each keras-hub 0.32 block, by path suffix.
KERAS_HUB_EXPERTS = {
    "mixtral": {
        "experts/expert_feedforward_gate_dense",
        "experts/expert_feedforward_intermediate_dense",
        "experts/expert_feedforward_output_dense",
    },
    "qwen_moe": {"experts/expert_feedforward_gate_dense", "experts/expert_feedforward_output_dense"},
    "qwen3_moe": {"experts/expert_feedforward_gate_dense", "experts/expert_feedforward_output_dense"},
    "qwen3_5_moe": {"experts/expert_feedforward_gate_dense", "experts/expert_feedforward_output_dense"},
    "gpt_oss": {
        "experts/gate_up_proj", "experts/gate_up_proj_bias", "experts/down_proj",
        "experts/down_proj_bias",
    },
    "gemma4": {
        "moe_expert_bank/gate_proj", "moe_expert_bank/up_proj", "moe_expert_bank/down_proj",
        "moe_expert_bank/per_expert_scale",
    },
}


@pytest.mark.parametrize("name", sorted(KERAS_HUB_EXPERTS))
def test_keras_hub_moe_blocks(name):
    pytest.importorskip("keras_hub")
    backbone = _keras_hub_backbones()[name]()
    found = layouts_of(backbone)
    sharded = {}
    for path, axes in found.items():
        if axes is not None:
            sharded["/".join(path.split("/")[-2:])] = axes
    assert set(sharded) == KERAS_HUB_EXPERTS[name]
    for axes in sharded.values():
        assert axes[0] == "expert" and all(a is None for a in axes[1:])
    # The shared experts' width goes over a model axis when there is one.
    found = layouts_of(
        backbone, model_axis="model",
        mesh_kwargs={"shape": (2, 2, 2), "names": ("batch", "expert", "model")},
    )
    shared = {p: a for p, a in found.items() if "shared_expert" in p and a is not None}
    if name in ("qwen_moe", "qwen3_5_moe"):
        assert len(shared) == 3
        assert all("model" in axes for axes in shared.values())
    else:
        assert not shared


def test_rules_do_not_overlap():
    paths = [
        "a/experts/up_kernel", "a/stacked_experts/down_bias", "a/stacked_experts_12/up_kernel", "a/experts/kernel_3",
        "a/shared_expert/up_kernel", "b/experts/gate_up_proj", "b/experts/gate_up_proj_bias",
        "c/moe_expert_bank/up_proj", "d/shared_expert_dense/feedforward_gate_dense/kernel",
        "e/experts/expert_feedforward_output_dense",
    ]
    for path in paths:
        matches = [p for _, p, _ in layout_rules.RULES if re.fullmatch(p, path)]
        assert len(matches) == 1, (path, matches)
    for path in ("a/router/kernel", "a/router/expert_bias", "a/shared_gate/kernel", "a/gates/kernel_0"):
        assert not any(re.fullmatch(p, path) for _, p, _ in layout_rules.RULES), path


def test_expert_parallel_is_a_model_parallel_with_the_map():
    distribution = keras_moe.distribution.expert_parallel(mesh())
    assert isinstance(distribution, keras.distribution.ModelParallel)
    assert distribution.batch_dim_name == "batch"
    assert distribution.expert_axis == "expert"
    assert distribution.get_tensor_layout("moe/experts/up_kernel").axes == ("expert", None, None)
    same = keras_moe.distribution.expert_parallel(
        mesh((8,), ("devices",)), expert_axis="devices", batch_axis="devices"
    )
    assert same.batch_dim_name == same.expert_axis == "devices"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expert_axis": "experts"}, r"`expert_axis` must be one of \('batch', 'expert'\)"),
        ({"model_axis": "model"}, r"`model_axis` must be one of"),
        ({"model_axis": "expert"}, r"`model_axis` must differ from `expert_axis`"),
        ({"batch_axis": "data"}, r"`batch_axis` must be one of"),
        ({"exchange": "alltoall"}, r"`exchange` must be one of"),
    ],
)
def test_invalid_axes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_moe.distribution.expert_parallel(mesh(), **kwargs)


def test_layout_map_needs_a_device_mesh():
    with pytest.raises(ValueError, match="`device_mesh` must be a keras.distribution.DeviceMesh"):
        keras_moe.distribution.layout_map((2, 4))


def test_indivisible_experts_name_the_layer_and_both_numbers():
    layer = keras_moe.layers.SparseMoE(6, 16, name="moe")
    layer.build((None, 8))
    distribution = keras_moe.distribution.expert_parallel(mesh())
    assert distribution.get_variable_layout(layer.router.kernel).axes == (None, None)
    with pytest.raises(
        ValueError,
        match=r"Layer 'moe/experts': num_experts=6 is not divisible by the 4 devices of mesh axis 'expert'",
    ):
        distribution.get_variable_layout(layer.experts.up_kernel)


def test_indivisible_width_is_reported():
    layer = keras_moe.layers.SparseMoE(4, 15, name="moe")
    layer.build((None, 8))
    distribution = keras_moe.distribution.expert_parallel(
        mesh((2, 2, 2), ("batch", "expert", "model")), model_axis="model"
    )
    with pytest.raises(ValueError, match=r"dimension 2=15 is not divisible by the 2 devices of mesh axis 'model'"):
        distribution.get_variable_layout(layer.experts.up_kernel)


def test_sharding_helpers_are_no_ops_without_a_distribution():
    x = np.ones((4, 8, 2, 3), "float32")
    assert keras_moe.distribution.active() is None
    assert keras_moe.distribution.shard_groups(x) is x
    assert keras_moe.distribution.shard_experts(x) is x
