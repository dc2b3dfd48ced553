"""Restoring onto an 8-device CPU mesh: parameters land sharded by the rules, logits unchanged."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import make_hf_model, make_inputs, torch_forward
from vipllava_jax import VipLlavaForConditionalGeneration, make_mesh
from vipllava_jax.convert import hf_to_orbax
from vipllava_jax.nn.sharding import logical_to_spec


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf = make_hf_model()
    src = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(src)
    dst = tmp_path_factory.mktemp("orbax") / "ckpt"
    hf_to_orbax(src, dst)
    return hf, dst


def test_logical_to_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("embed", "mlp"), (48, 96), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (48, 7), mesh) == P("fsdp", None)
    assert logical_to_spec(("norm",), (48,), mesh) == P(None)
    # a mesh axis is used once per array
    assert logical_to_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}])
def test_sharded_restore_matches_reference(converted, axes):
    hf, path = converted
    mesh = make_mesh(axes)
    model = VipLlavaForConditionalGeneration.from_pretrained(path, mesh=mesh)
    q = model.language_model.layers[0].self_attn.q_proj.kernel.get_value()  # [embed, heads]
    assert q.sharding.mesh.shape == mesh.shape
    expected = logical_to_spec(("embed", "heads"), q.shape, mesh)
    assert q.sharding.spec == expected
    assert any(s is not None for s in expected), "the test shape should really be sharded"
    assert len({str(s.index) for s in q.addressable_shards}) > 1

    inputs = make_inputs(hf.config)
    ref, ref_loss = torch_forward(hf, inputs)
    out = model(**inputs)
    keep = inputs["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - ref)[keep].max() <= 1e-4
    np.testing.assert_allclose(float(out.loss), ref_loss, rtol=1e-5)
