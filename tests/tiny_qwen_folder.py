"""A tiny Qwen-Image(-Edit) model folder with every part the real pipelines load, for the real-model code paths.

Random weights from diffusers' and transformers' real classes, deterministic for a seed, about 3 MB in bf16, written
per test session (nothing binary is committed). The same folder serves diffusers' `from_pretrained` (model_index.json)
and LightX2V's `QwenImageRunner` (its own layout: transformer/, scheduler/, vae/, text_encoder/, tokenizer/,
processor/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Two things are fixed by LightX2V, not by the weights:
# QwenImageScheduler's rope is QwenEmbedRope(axes_dim=[16, 56, 56]), so the transformer has one head of dim 128;
# the Qwen-Image VAE has 16 latent channels (the transformer packs 2x2: in_channels 64) and the runner derives
# vae_scale_factor 8 from its three temporal downsamples. The Qwen2.5-VL text encoder's hidden size is the
# transformer's joint_attention_dim; its tokenizer is byte-level BPE (256 byte tokens, no merges) plus Qwen's special
# tokens, whose ids the config names (image_token_id...). The i2i text encoder resizes the reference to 1024 x 1024
# for the VAE (VAE_IMAGE_SIZE, fixed area) whatever --size is, so the transformer sees about 4096 reference tokens.
RUNNER_TEXT_DIM = 32
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def write_tiny_qwen_folder(directory: Path, pipeline: str = "QwenImageEditPlusPipeline", seed: int = 0) -> Path:
    """transformer/, scheduler/, vae/, text_encoder/, tokenizer/, processor/ and a model_index.json naming `pipeline`:
    the same bytes for the same seed."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from calib.backends.loop import QWEN_SCHEDULER_CONFIG

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(QWEN_SPECIAL_TOKENS)
    ids = {token: bpe.token_to_id(token) for token in QWEN_SPECIAL_TOKENS}
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    tokenizer.save_pretrained(directory / "tokenizer")
    # the condition image the vision tower sees: at most 2 x 2 merged patches of 28 px
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    processor.save_pretrained(directory / "processor")
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab) + len(QWEN_SPECIAL_TOKENS), hidden_size=RUNNER_TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_theta": 1000000.0, "rope_type": "default", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=RUNNER_TEXT_DIM, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2_5_VLForConditionalGeneration(text_encoder).to(torch.bfloat16).save_pretrained(directory / "text_encoder")
    torch.manual_seed(seed)
    QwenImageTransformer2DModel(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=1, joint_attention_dim=RUNNER_TEXT_DIM,
                                axes_dims_rope=(16, 56, 56), zero_cond_t=True).to(torch.bfloat16).save_pretrained(directory / "transformer")
    torch.manual_seed(seed)
    AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]).to(torch.bfloat16).save_pretrained(
        directory / "vae")
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(QWEN_SCHEDULER_CONFIG, _class_name="FlowMatchEulerDiscreteScheduler")))
    components = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if pipeline != "QwenImagePipeline":  # the edit pipelines also show the reference image to the text encoder
        components["processor"] = ["transformers", "Qwen2VLProcessor"]
    (directory / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}, indent=1))
    return directory
