"""Parts shared by the families' tiny random-weight test pipelines (built from configs, no hub, offline).

Configs follow the team spec ``shared/spec/integration.md`` (diffusers' dummy components).
"""
from __future__ import annotations

import json
import os


def in_eval_mode(pipe):
    """``pipe`` with every module component in eval mode (components built from configs start in train mode)."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_vae(latent_channels: int = 4, blocks: int = 2):
    """An ``AutoencoderKL`` of ``blocks`` levels (4…8 channels): VAE factor ``2**(blocks − 1)``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8, 8, 8][:blocks], down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, latent_channels=latent_channels, norm_num_groups=2,
        sample_size=32,
    )


def tiny_clip_tokenizer(folder: str):
    """A CLIPTokenizer over single letters (no merges): every prompt tokenises offline."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!",
                         model_max_length=16)


def tiny_gemma_tokenizer():
    """A Gemma tokenizer over single printable characters (no merges, no files): any prompt tokenises offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return GemmaTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              unk_token="<unk>")


__all__ = ["in_eval_mode", "tiny_clip_tokenizer", "tiny_gemma_tokenizer", "tiny_vae"]
