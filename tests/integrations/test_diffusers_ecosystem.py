"""The adapters beside diffusers' own features: save_pretrained, LoRA, fused QKV projections."""
import pytest
import torch

from tests.tiny_diffusers import BUILDERS


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tiny_builders_return_pipelines_in_eval_mode(family):
    pipe = BUILDERS[family]()
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules and not any(m.training for c in modules for m in c.modules())
