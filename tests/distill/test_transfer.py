"""Attention transfer: the chunked weight cross-entropy against a dense reference, its linear memory,
teacher forcing, and stage 1 training only the mixers' new parameters."""
import copy

import pytest
import timm
import torch

import linvision  # noqa: F401  (registers linvit)
from linvision.benchmarks.memory import PeakTensorMemory
from linvision.distill.transfer import (AttentionTransfer, attention_weight_ce, new_parameter_names,
                                        select_new_parameters, softmax_rows)
from linvision.mixers.hedgehog import normalised_rows


def dense_ce(q, k, a):
    """Reference: the whole [B, H, N, N] matrices, LoLCATs' clamp-log soft-target cross-entropy."""
    t = softmax_rows(q, k, 0, q.shape[1])
    return -(t * a.clamp(min=1e-12).log().log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("name", ["hedgehog", "lolcats", "liger"])
def test_weight_ce_equals_dense_reference(name):
    torch.manual_seed(0)
    mixer = linvision.create_mixer(name, 16, 2, **({"radius": 2} if name != "hedgehog" else {})).double()
    x = torch.randn(2, 1 + 63, 16, dtype=torch.float64)
    q, k, rows = mixer.attention_rows(x, (7, 9), 1)
    chunked = attention_weight_ce(q, k, rows, chunk=10)
    dense = dense_ce(q, k, rows(0, 64))
    assert abs(float(chunked.detach()) - float(dense.detach())) < 1e-10 * abs(float(dense.detach()))
    params = [p for n, p in mixer.named_parameters() if not n.startswith(("qkv", "proj"))]
    if params:  # the gradients of the chunked, checkpointed loss are the dense loss's
        g1 = torch.autograd.grad(chunked, params)
        q, k, rows = mixer.attention_rows(x, (7, 9), 1)
        g2 = torch.autograd.grad(dense_ce(q, k, rows(0, 64)), params)
        for a, b in zip(g1, g2):
            assert (a - b).norm() <= 1e-9 * b.norm()


def _peak(n_tokens, dense):
    torch.manual_seed(0)
    B, H, D = 1, 2, 8
    q, k = torch.randn(B, n_tokens, H, D), torch.randn(B, n_tokens, H, D)
    fq, fk = (torch.rand(B, n_tokens, H, 2 * D, requires_grad=True) for _ in range(2))
    rows = lambda a, b: normalised_rows(fq[:, a:b], fk, 1e-12)  # noqa: E731

    def work():
        loss = dense_ce(q, k, rows(0, n_tokens)) if dense else attention_weight_ce(q, k, rows, chunk=16)
        loss.backward()

    with PeakTensorMemory([q, k, fq, fk]) as tracker:
        work()
    return tracker.peak


def test_weight_ce_memory_is_linear_in_tokens():
    small, large = _peak(64, False), _peak(256, False)
    assert large / small < 5  # 4x the tokens: ~4x the memory (the dense loss: ~16x)
    dense = _peak(256, True)
    assert dense / _peak(64, True) > 12
    assert large < dense / 4


def tiny_vit(mixer):
    torch.manual_seed(0)
    return timm.create_model("linvit_tiny_patch16_224", mixer=mixer, img_size=16, patch_size=4, embed_dim=16,
                             depth=2, num_heads=2, num_classes=3, mixer_kwargs={"lolcats": {"radius": 2}})


def student_of(teacher, mixer):
    student = tiny_vit(mixer)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(m in new_parameter_names(student) for m in missing)
    return student


@pytest.mark.parametrize("mixer", ["hedgehog", "lolcats"])
def test_teacher_forcing_reproduces_the_teacher(mixer):
    teacher = tiny_vit("softmax").eval()
    student = student_of(teacher, mixer).eval()
    x = torch.randn(2, 3, 16, 16)
    transfer = AttentionTransfer(student)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-5)
    assert set(transfer.losses) == {"blocks.0.attn", "blocks.1.attn"}
    transfer.remove()
    student(x)
    assert not transfer.losses


def test_stage_one_trains_only_the_new_parameters():
    teacher = tiny_vit("softmax").eval()
    student = student_of(teacher, "lolcats").eval()
    names = select_new_parameters(student)
    assert names and all(n.split(".")[3] in ("feature_map_q", "feature_map_k") or n.endswith("window_factors")
                         for n in names)
    before = copy.deepcopy(student.state_dict())
    transfer = AttentionTransfer(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        student(torch.randn(2, 3, 16, 16))
        terms = transfer.loss(weights=1.0, outputs=1000.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(names)


def test_transfer_refuses_models_without_new_mixers():
    with pytest.raises(ValueError, match="nothing to transfer"):
        AttentionTransfer(tiny_vit("linear"))
    with pytest.raises(ValueError, match="nothing to train"):
        select_new_parameters(tiny_vit("liger"))


def test_timm_vit_path_transfer_and_lora():
    """A timm ViT (not linvit) through linvision.timm.linearize: hooks reach the wrapped mixers, LoRA the
    fused projections inside them, and the merge gives back plain Linears with the adapted weights."""
    from linvision.distill.lora import add_lora, merge_lora
    from linvision.linearized import linearize_classifier

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=3).eval()
    student = linearize_classifier(vit, "lolcats", {"lolcats": {"radius": 2}}).eval()
    x = torch.randn(2, 3, 32, 32)
    transfer = AttentionTransfer(student)
    torch.testing.assert_close(student(x), vit(x), rtol=1e-5, atol=1e-5)
    transfer.remove()
    lora = add_lora(student, rank=2)
    assert lora and all(".attn.mixer." in n and "lora_" in n for n in lora)
    for n, p in student.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    adapted = student(x)
    merge_lora(student)
    assert type(student.blocks[0].attn.mixer.qkv) is torch.nn.Linear
    torch.testing.assert_close(student(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_on_the_linear_mixer_is_seen_without_autograd():
    """The plain linear mixer's no-grad streamed path reads qkv.weight; with LoRA it takes the projection call."""
    from linvision.distill.lora import add_lora

    model = tiny_vit("linear").eval()
    add_lora(model, rank=2)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        streamed = model(x)
    torch.testing.assert_close(streamed, model(x).detach(), rtol=1e-5, atol=1e-5)
