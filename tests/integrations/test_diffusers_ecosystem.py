"""The adapters beside diffusers' own features: save_pretrained, LoRA, fused QKV projections."""
import pytest
import torch

from tests.tiny_diffusers import BUILDERS


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tiny_builders_return_pipelines_in_eval_mode(family):
    pipe = BUILDERS[family]()
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules and not any(m.training for c in modules for m in c.modules())


# --- save_pretrained with an adapter installed -----------------------------------------------------------

from linvision.diffusers import DiffusersAdapter  # noqa: E402
from linvision.diffusers.adapter import ADAPTER_FOLDER  # noqa: E402
from tests import tiny_diffusers as tiny  # noqa: E402

DENOISER = {"unet": "unet", "dit": "transformer", "flux": "transformer"}


def images(pipe, family):
    size = tiny.TRAIN_SIZE[family]
    with torch.no_grad():
        return tiny.run(pipe, family, size, size)


def randomize(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_pipeline_save_with_an_adapter_writes_the_teacher_and_the_adapter(family, tmp_path):
    pipe = tiny.BUILDERS[family]()
    teacher = images(pipe, family)
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    randomize(adapter)
    student = images(pipe, family)
    pipe.save_pretrained(tmp_path)  # diffusers' own call, adapter installed
    assert adapter.installed and torch.equal(images(pipe, family), student)  # still installed after the save
    loaded = tiny.load(str(tmp_path))  # plain diffusers loading: the teacher, no meta tensors, no random layers
    assert torch.allclose(images(loaded, family), teacher, atol=1e-6)
    DiffusersAdapter.from_pretrained(str(tmp_path / DENOISER[family] / ADAPTER_FOLDER)).install(loaded)
    assert torch.allclose(images(loaded, family), student, atol=1e-6)
    adapter.uninstall()
    assert "save_pretrained" not in vars(pipe.components[DENOISER[family]])


# --- LoRA ------------------------------------------------------------------------------------------------

# peft (the [test] extra) is imported by the LoRA tests themselves, so the rest of the module runs without it


def lora_folder(tmp_path, seed=0):
    """Tiny non-zero LoRA weights for the tiny SD UNet's attentions, saved as diffusers writes them."""
    import peft
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    source = tiny.build_sd()
    source.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(source.unet))
    return str(tmp_path)


def lora_on_cross_attention(pipe):
    return [n for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_q") and hasattr(m, "lora_A")]


def test_lora_then_construct_inherits_the_lora_attention_and_keeps_the_rest(tmp_path):
    pipe = tiny.build_sd()
    plain = images(pipe, "unet")
    pipe.load_lora_weights(lora_folder(tmp_path))
    with_lora = images(pipe, "unet")
    assert not torch.allclose(with_lora, plain)
    adapter = DiffusersAdapter.construct_for(pipe, "softmax")  # teacher-equivalent: LoRA'd weights inherited
    assert lora_on_cross_attention(pipe)
    assert torch.allclose(images(pipe, "unet"), with_lora, atol=1e-5)
    adapter.uninstall()
    assert torch.allclose(images(pipe, "unet"), with_lora, atol=1e-6)


def test_install_then_lora_reaches_the_other_layers(tmp_path):
    folder = lora_folder(tmp_path)
    pipe = tiny.build_sd()
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    randomize(adapter)
    before = images(pipe, "unet")
    pipe.load_lora_weights(folder)
    assert lora_on_cross_attention(pipe)
    assert not torch.allclose(images(pipe, "unet"), before)
    pipe.unet.disable_adapters()
    assert torch.allclose(images(pipe, "unet"), before, atol=1e-6)


def test_peft_lora_on_the_mixer_linears(tmp_path):
    import peft

    pipe = tiny.build_sd()
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    before = images(pipe, "unet")
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.mixer.qkv", "attn1.mixer.proj"]))
    wrapped = [n for n, m in pipe.unet.named_modules() if n.endswith("attn1.mixer.qkv") and hasattr(m, "lora_A")]
    assert len(wrapped) == len(adapter.layers())
    assert torch.allclose(images(pipe, "unet"), before, atol=1e-6)  # LoRA B starts at zero
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert not torch.allclose(images(pipe, "unet"), before)
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".mixer." in n for n in trainable)


# --- fused QKV projections -------------------------------------------------------------------------------


def test_fuse_install_uninstall_unfuse():
    pipe = tiny.build_sd()
    teacher = images(pipe, "unet")
    pipe.unet.fuse_qkv_projections()
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    images(pipe, "unet")
    adapter.uninstall()
    pipe.unet.unfuse_qkv_projections()  # diffusers finds the processors it saved
    assert torch.allclose(images(pipe, "unet"), teacher, atol=1e-5)


def test_fused_joint_attention_is_a_clear_error_until_unfused():
    pipe = tiny.build_flux()
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse them first"):
        DiffusersAdapter.construct_for(pipe, "lit")
    pipe.transformer.unfuse_qkv_projections()
    DiffusersAdapter.construct_for(pipe, "lit").uninstall()
